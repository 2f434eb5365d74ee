// The page: wires the model banner, settings, media and chat together, and keeps what must
// survive a reload (state.js).

import { getJSON } from "./api.js";
import { Chat } from "./chat.js";
import { bannerText, caveat, renderExamples } from "./demo.js";
import { plainWords } from "./errors.js";
import { Media } from "./media.js";
import { Settings } from "./settings.js";
import * as state from "./state.js";

const $ = (id) => document.getElementById(id);

const ui = {
  modelInfo: $("model-info"),
  banner: $("demo-banner"),
  bannerText: $("demo-banner-text"),
  settings: $("settings"),
  settingsForm: $("settings-form"),
  settingsSaved: $("settings-saved"),
  maxTokensHint: $("max-tokens-hint"),
  fpsLimit: $("fps-limit"),
  apiKey: $("api-key"),
  maxTokens: $("max-tokens"),
  temperature: $("temperature"),
  fps: $("fps"),
  error: $("error"),
  dropZone: $("drop-zone"),
  fileInput: $("file-input"),
  chooseFile: $("choose-file"),
  chooser: $("chooser"),
  replaceBar: $("replace-bar"),
  replace: $("replace"),
  demoRow: $("demo-row"),
  demoClip: $("demo-clip"),
  examples: $("examples"),
  exampleList: $("example-list"),
  noMedia: $("no-media"),
  urlForm: $("url-form"),
  url: $("media-url"),
  askForm: $("ask-form"),
  question: $("question"),
  ask: $("ask"),
  stop: $("stop"),
  newChat: $("new-chat"),
  announce: $("announce"),
};

function announce(text) {
  ui.announce.textContent = "";
  // a fresh text node after a tick, so the same sentence twice is announced twice
  setTimeout(() => { ui.announce.textContent = text; }, 50);
}

function showError(err) {
  const words = err && err.headline ? err : plainWords(err);
  ui.error.querySelector(".error-headline").textContent = words.headline;
  ui.error.querySelector(".error-detail").textContent = words.detail || "";
  ui.error.hidden = false;
  if (err && err.status === 401) ui.settings.open = true;
}

function clearError() {
  ui.error.hidden = true;
}

let model = null; // the /v1/models entry, once known

/** The subject changed (a new video or image, or none): the conversation belongs to the old one. */
function subjectChanged() {
  if (!chat) return;
  chat.reset();
  const id = media.isVideo() ? media.video.id : null;
  state.setVideoInUrl(id);
  showExamples(id ? state.loadExamples(id) : null);
  if (id) chat.restore(state.loadConversation(id));
  const loaded = media.kind !== null;
  ui.chooser.hidden = loaded; // once something is loaded the uploader folds into one "Replace…" button
  ui.replaceBar.hidden = !loaded;
  ui.replace.setAttribute("aria-expanded", "false");
  updateAsk();
}

/** Ask works only with something attached: an answer about nothing would look like any other. */
function updateAsk() {
  const attached = media.part() !== null;
  ui.ask.disabled = !attached;
  ui.noMedia.hidden = attached;
}

const media = new Media({
  fps: () => settings.values().fps,
  framesThatFit() {
    // the service keeps up to a quarter of the context for the answer; the rest is mostly frames
    const perFrame = model && model.llamavid && model.llamavid.tokens_per_frame;
    return perFrame && model.max_model_len ? Math.floor((0.75 * model.max_model_len) / perFrame) : null;
  },
  onChange: subjectChanged,
  onError: showError,
  announce,
});

const chat = new Chat({
  media,
  sampling() {
    const { max_tokens: maxTokens, temperature } = settings.values();
    const out = {};
    if (maxTokens !== null && maxTokens > 0) out.max_tokens = Math.floor(maxTokens);
    if (temperature !== null) out.temperature = temperature;
    return out;
  },
  onBusy(busy) {
    ui.stop.disabled = !busy;
    ui.ask.setAttribute("aria-disabled", String(busy));
    ui.askForm.classList.toggle("busy", busy);
  },
  onAuthError() {
    ui.settings.open = true;
  },
  caveat(question) {
    const examples = media.isVideo() ? state.loadExamples(media.video.id) : null;
    return caveat(model && model.llamavid && model.llamavid.demo, examples, question);
  },
  onSave() {
    if (media.isVideo()) state.saveConversation(media.video.id, chat.snapshot());
  },
  announce,
});

// -- the model and the demo banner -----------------------------------------------------------------
const BANNER_DISMISSED = "llamavid.bannerDismissed";

let modelRetry = null;

async function loadModel() {
  clearTimeout(modelRetry);
  let list;
  try {
    list = await getJSON("/v1/models");
  } catch (err) {
    if (err.status === 401) {
      ui.modelInfo.textContent = err.code === "invalid_api_key"
        ? "The service rejected the API key: check it under Settings."
        : "Enter the API key under Settings to use this service.";
      if (err.code === "invalid_api_key") showError(err);
      ui.settings.open = true;
    } else if (err.status === 503 || err.status === 0) {
      ui.modelInfo.textContent = err.status ? "The service is starting (loading the model)…" : "Cannot reach the service; retrying…";
      modelRetry = setTimeout(loadModel, 2000);
    } else {
      ui.modelInfo.textContent = plainWords(err).headline;
    }
    return;
  }
  model = list.data && list.data[0];
  if (!model) {
    ui.modelInfo.textContent = "No model is loaded yet; retrying…";
    modelRetry = setTimeout(loadModel, 3000);
    return;
  }
  const info = model.llamavid || {};
  const facts = [info.device, info.dtype, info.tokens_per_frame && `${info.tokens_per_frame} tokens per frame`,
    model.max_model_len && `context ${model.max_model_len} tokens`].filter(Boolean);
  ui.modelInfo.textContent = `Model: ${model.id}${facts.length ? ` (${facts.join(", ")})` : ""}`;
  settings.setLimits({ ...(info.limits || {}) }, model.max_model_len);
  const text = bannerText(info);
  let dismissed = null;
  try { dismissed = localStorage.getItem(BANNER_DISMISSED); } catch { /* storage refused */ }
  ui.banner.hidden = !text || dismissed === text;
  if (text) {
    ui.bannerText.textContent = text;
    ui.banner.dataset.demo = info.demo || "warning";
  }
  ui.demoRow.hidden = info.demo !== "trained";
  // "What happens in the video?" gets an empty answer from the demo: suggest what it can do
  if (info.demo === "trained") ui.question.placeholder = "e.g. What colour is the circle?";
}

$("banner-dismiss").addEventListener("click", () => {
  ui.banner.hidden = true;
  try { localStorage.setItem(BANNER_DISMISSED, ui.bannerText.textContent); } catch { /* storage refused */ }
  ui.question.focus();
});

// -- settings --------------------------------------------------------------------------------------
const settings = new Settings({
  form: ui.settingsForm, saved: ui.settingsSaved, apiKey: ui.apiKey,
  inputs: { max_tokens: ui.maxTokens, temperature: ui.temperature, fps: ui.fps },
  hints: { max_tokens: ui.maxTokensHint, fps: ui.fpsLimit },
  onSaved() {
    clearError();
    loadModel();
  },
});

// -- choosing a video or image ---------------------------------------------------------------------
/** A new subject replaces the conversation: ask first when there is one to lose. */
function mayReplace() {
  if (!chat.records.length) return true;
  if (!window.confirm("Load a new video? This ends the current conversation.")) return false;
  if (media.isVideo()) state.saveConversation(media.video.id, null);
  return true;
}

ui.chooseFile.addEventListener("click", () => ui.fileInput.click());

ui.fileInput.addEventListener("change", () => {
  const file = ui.fileInput.files && ui.fileInput.files[0];
  ui.fileInput.value = "";
  if (!file || !mayReplace()) return;
  clearError();
  media.loadFile(file);
});

ui.urlForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const url = ui.url.value.trim();
  if (!url || !mayReplace()) return;
  clearError();
  media.loadUrl(url);
});

ui.replace.addEventListener("click", () => {
  const open = ui.chooser.hidden;
  ui.chooser.hidden = !open;
  ui.replace.setAttribute("aria-expanded", String(open));
  if (open) ui.chooseFile.focus();
});

// -- the demo clip and its example questions ---------------------------------------------------------
function showExamples(questions) {
  renderExamples(ui.examples, ui.exampleList, questions, (question) => {
    if (chat.busy) return;
    ui.question.value = question;
    ui.askForm.requestSubmit();
  });
}

ui.demoClip.addEventListener("click", async () => {
  if (!mayReplace()) return;
  clearError();
  const clip = await media.loadDemo();
  if (clip) {
    state.saveExamples(clip.id, clip.questions);
    showExamples(clip.questions);
  }
});

for (const type of ["dragenter", "dragover"]) {
  ui.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    ui.dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  ui.dropZone.addEventListener(type, () => ui.dropZone.classList.remove("dragging"));
}
ui.dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const transfer = event.dataTransfer;
  if (!mayReplace()) return;
  clearError();
  if (transfer.files && transfer.files.length) media.loadFile(transfer.files[0]);
  else {
    const link = (transfer.getData("text/uri-list") || transfer.getData("text/plain") || "").split("\n")[0].trim();
    if (link) media.loadUrl(link);
  }
});
// A file dropped outside the zone would make the browser navigate away to it.
for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());

// -- asking ----------------------------------------------------------------------------------------
ui.askForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (chat.busy) return;
  const question = ui.question.value;
  if (!question.trim() || !media.part()) {
    ui.question.focus();
    return;
  }
  ui.question.value = "";
  await chat.ask(question);
});

ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.askForm.requestSubmit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && chat.busy) {
    chat.stop();
    event.preventDefault();
  }
});

ui.stop.addEventListener("click", () => {
  chat.stop();
  ui.question.focus(); // the Stop button is about to be disabled: keep the keyboard focus somewhere useful
});

ui.newChat.addEventListener("click", () => {
  chat.reset();
  if (media.isVideo()) state.saveConversation(media.video.id, null);
  announce("New conversation.");
  ui.question.focus();
});

document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  ui.question.focus();
});

$("error-dismiss").addEventListener("click", () => {
  clearError();
  ui.question.focus();
});

loadModel();
updateAsk();
const shared = state.videoInUrl();
if (shared) media.loadById(shared); // a reload, or a shared link: the same video and its conversation
