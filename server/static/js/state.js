// What survives a reload: the video's id in the address (so a link to the page can be shared),
// the conversation and the demo's example questions in session storage (per video, per tab),
// and the settings in local storage. Storage can be refused (private mode): then nothing is kept.

const SETTINGS = "llamavid.settings";
const conversationKey = (id) => `llamavid.conversation.${id}`;
const examplesKey = (id) => `llamavid.examples.${id}`;

function read(storage, key) {
  try {
    const text = storage.getItem(key);
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

function write(storage, key, value) {
  try {
    if (value === null) storage.removeItem(key);
    else storage.setItem(key, JSON.stringify(value));
  } catch {
    // full or refused: the page still works, it just forgets on reload
  }
}

export function videoInUrl() {
  const id = new URLSearchParams(location.search).get("video");
  return id && /^vid-[A-Za-z0-9_-]+$/.test(id) ? id : null;
}

export function setVideoInUrl(id) {
  const url = new URL(location.href);
  if (id) url.searchParams.set("video", id);
  else url.searchParams.delete("video");
  if (url.href !== location.href) history.replaceState(null, "", url);
}

export const loadConversation = (id) => read(sessionStorage, conversationKey(id));
export const saveConversation = (id, snapshot) => write(sessionStorage, conversationKey(id), snapshot);
export const loadExamples = (id) => read(sessionStorage, examplesKey(id));
export const saveExamples = (id, questions) => write(sessionStorage, examplesKey(id), questions);
export const loadSettings = () => read(localStorage, SETTINGS) || {};
export const saveSettings = (values) => write(localStorage, SETTINGS, values);

/** Problems with the settings, by field, against the service's limits (from /v1/models). */
export function checkSettings(values, limits) {
  const problems = {};
  const maxTokens = limits.max_tokens;
  if (values.max_tokens !== null && (!Number.isInteger(values.max_tokens) || values.max_tokens < 1 ||
      (maxTokens && values.max_tokens > maxTokens))) {
    problems.max_tokens = `A whole number from 1${maxTokens ? ` to ${maxTokens}` : ""}.`;
  }
  if (values.temperature !== null && !(values.temperature >= 0 && values.temperature <= 2)) {
    problems.temperature = "A number from 0 to 2.";
  }
  if (values.fps !== null && !(values.fps > 0 && (!limits.max_fps || values.fps <= limits.max_fps))) {
    problems.fps = `More than 0${limits.max_fps ? ` and at most ${limits.max_fps}` : ""} (this service's limit).`;
  }
  return problems;
}
