// The page: wires the model banner, settings, media and chat together.

import { apiKey, getJSON, saveApiKey } from "./api.js";
import { Chat } from "./chat.js";
import { plainWords } from "./errors.js";
import { Media } from "./media.js";

const $ = (id) => document.getElementById(id);

const ui = {
  modelInfo: $("model-info"),
  banner: $("demo-banner"),
  settings: $("settings"),
  settingsForm: $("settings-form"),
  settingsSaved: $("settings-saved"),
  apiKey: $("api-key"),
  maxTokens: $("max-tokens"),
  temperature: $("temperature"),
  fps: $("fps"),
  error: $("error"),
  dropZone: $("drop-zone"),
  fileInput: $("file-input"),
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

function number(input, parse) {
  const value = parse(input.value);
  return Number.isFinite(value) && input.value.trim() !== "" ? value : null;
}

const media = new Media({
  fps: () => number(ui.fps, parseFloat),
  onChange: () => chat && chat.reset(),
  onError: showError,
  announce,
});

const chat = new Chat({
  media,
  sampling() {
    const out = {};
    const maxTokens = number(ui.maxTokens, (v) => parseInt(v, 10));
    if (maxTokens !== null && maxTokens > 0) out.max_tokens = maxTokens;
    const temperature = number(ui.temperature, parseFloat);
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
  announce,
});

// -- the model and the demo banner -----------------------------------------------------------------
const DEMO_TEXT = {
  random: "Demo model with random weights: its answers are noise, not descriptions of your video. Streaming, " +
    "stopping and the relevance bars all work; start the service with --model DIR for real answers.",
  trained: "Demo model: a small LLaMA-VID trained only on synthetic videos of coloured shapes. It can answer " +
    "about shapes, colours and how they move, not about real-world videos. Start the service with --model DIR " +
    "for a full model.",
};

let modelRetry = null;

async function loadModel() {
  clearTimeout(modelRetry);
  let list;
  try {
    list = await getJSON("/v1/models");
  } catch (err) {
    if (err.status === 401) {
      ui.modelInfo.textContent = "Enter the API key under Settings to use this service.";
      ui.settings.open = true;
    } else if (err.status === 503 || err.status === 0) {
      ui.modelInfo.textContent = err.status ? "The service is starting (loading the model)…" : "Cannot reach the service; retrying…";
      modelRetry = setTimeout(loadModel, 2000);
    } else {
      ui.modelInfo.textContent = plainWords(err).headline;
    }
    return;
  }
  const model = list.data && list.data[0];
  if (!model) {
    ui.modelInfo.textContent = "No model is loaded yet; retrying…";
    modelRetry = setTimeout(loadModel, 3000);
    return;
  }
  const info = model.llamavid || {};
  const facts = [info.device, info.dtype, info.tokens_per_frame && `${info.tokens_per_frame} tokens per frame`,
    model.max_model_len && `context ${model.max_model_len} tokens`].filter(Boolean);
  ui.modelInfo.textContent = `Model: ${model.id}${facts.length ? ` (${facts.join(", ")})` : ""}`;
  if (model.max_model_len) ui.maxTokens.max = String(model.max_model_len);
  const text = DEMO_TEXT[info.demo] || info.warning;
  ui.banner.hidden = !text;
  if (text) {
    ui.banner.textContent = text;
    ui.banner.dataset.demo = info.demo || "warning";
  }
}

// -- settings --------------------------------------------------------------------------------------
ui.apiKey.value = apiKey();
ui.settingsForm.addEventListener("submit", (event) => {
  event.preventDefault();
  saveApiKey(ui.apiKey.value);
  ui.settingsSaved.textContent = ui.apiKey.value.trim() ? "Saved. The key is used from now on." : "Saved (no API key).";
  clearError();
  loadModel();
});
ui.apiKey.addEventListener("change", () => saveApiKey(ui.apiKey.value));

// -- choosing a video or image ---------------------------------------------------------------------
ui.fileInput.addEventListener("change", () => {
  const file = ui.fileInput.files && ui.fileInput.files[0];
  if (!file) return;
  clearError();
  media.loadFile(file);
  ui.fileInput.value = "";
});

ui.urlForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const url = ui.url.value.trim();
  if (!url) return;
  clearError();
  media.loadUrl(url);
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
  if (!question.trim()) {
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
