// Talking to the service. Every call adds the API key (when one is set) and turns a non-2xx
// answer into an ApiError that carries the service's {"error": {message, type, param, code}}.

const KEY_STORAGE = "llamavid.apiKey";
let memoryKey = null; // used when localStorage is unavailable (private mode, disabled storage)

export function apiKey() {
  if (memoryKey !== null) return memoryKey;
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

export function saveApiKey(value) {
  const key = value.trim();
  memoryKey = key;
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    memoryKey = null;
  } catch {
    // storage refused: the key lasts as long as this page
  }
  forgetMedia();
}

export class ApiError extends Error {
  constructor(status, error = {}, retryAfter = null) {
    super(error.message || (status ? `HTTP ${status}` : "no answer from the service"));
    this.name = "ApiError";
    this.status = status; // 0: the request never got an answer
    this.code = error.code || null;
    this.type = error.type || null;
    this.param = error.param || null;
    this.retryAfter = retryAfter;
  }
}

export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

async function errorFrom(response) {
  let error = {};
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error) error = body.error;
  } catch {
    // not JSON: a proxy's error page, say
  }
  return new ApiError(response.status, error, response.headers.get("Retry-After"));
}

/** fetch() with the key; throws ApiError for HTTP errors and network failures, AbortError when aborted. */
export async function api(path, { method = "GET", json, body, signal } = {}) {
  const headers = authHeaders(json === undefined ? {} : { "Content-Type": "application/json" });
  let response;
  try {
    response = await fetch(path, { method, headers, body: json === undefined ? body : JSON.stringify(json), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { message: String(err.message || err) });
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJSON(path, options) {
  return (await api(path, options)).json();
}

/** A multipart upload with progress (fetch cannot report upload progress; XMLHttpRequest can). */
export function uploadFile(path, file, fields, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable && event.total > 0) onProgress(event.loaded / event.total);
    };
    xhr.onload = () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        // handled below
      }
      if (xhr.status >= 200 && xhr.status < 300 && body) resolve(body);
      else reject(new ApiError(xhr.status, (body && body.error) || {}, xhr.getResponseHeader("Retry-After")));
    };
    xhr.onerror = () => reject(new ApiError(0, { message: "the upload could not reach the service" }));
    const form = new FormData();
    form.append("file", file, file.name || "upload");
    for (const [name, value] of Object.entries(fields)) {
      if (value !== null && value !== undefined && value !== "") form.append(name, String(value));
    }
    xhr.send(form);
  });
}

// <img> and <video> cannot send an Authorization header: with a key set, media is fetched with
// the header and shown from a blob: URL instead.
const blobs = new Map();

export function mediaSrc(path) {
  if (!apiKey()) return Promise.resolve(path);
  if (!blobs.has(path)) {
    const promise = api(path)
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob));
    promise.catch(() => blobs.delete(path));
    blobs.set(path, promise);
  }
  return blobs.get(path);
}

export function forgetMedia() {
  for (const promise of blobs.values()) {
    promise.then((url) => URL.revokeObjectURL(url), () => {});
  }
  blobs.clear();
}
