// The settings form: the API key, the longest answer, temperature and frames per second. Saved
// in this browser (state.js) and checked against the limits the service reports in /v1/models,
// so a value the service would refuse is named here rather than failing a question later.

import { apiKey, saveApiKey } from "./api.js";
import * as state from "./state.js";

function number(input) {
  const value = Number(input.value);
  return input.value.trim() !== "" && Number.isFinite(value) ? value : null;
}

export class Settings {
  /** parts: form, saved (status line), apiKey (input), inputs {max_tokens, temperature, fps},
   * hints {max_tokens, fps} (limit lines), onSaved(). */
  constructor(parts) {
    this.parts = parts;
    this.limits = {};
    parts.apiKey.value = apiKey();
    parts.apiKey.addEventListener("change", () => saveApiKey(parts.apiKey.value));
    parts.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.save();
    });
  }

  values() {
    const out = {};
    for (const [name, input] of Object.entries(this.parts.inputs)) out[name] = number(input);
    return out;
  }

  /** The service's limits (max_model_len caps the answer too); stored values it refuses are dropped, not sent. */
  setLimits(limits, maxModelLen) {
    if (maxModelLen) limits.max_tokens = Math.min(limits.max_tokens || Infinity, maxModelLen);
    this.limits = limits;
    const { inputs, hints } = this.parts;
    for (const [name, key] of [["max_tokens", "max_tokens"], ["fps", "max_fps"]]) {
      if (limits[key]) inputs[name].max = String(limits[key]);
      hints[name].textContent = limits[key] ? `This service allows up to ${limits[key]}.` : "";
    }
    const stored = state.loadSettings();
    const problems = state.checkSettings({ max_tokens: null, temperature: null, fps: null, ...stored }, limits);
    for (const [name, input] of Object.entries(inputs)) {
      if (stored[name] !== undefined && stored[name] !== null && !(name in problems)) input.value = String(stored[name]);
    }
  }

  save() {
    const { inputs, saved, apiKey: keyInput } = this.parts;
    const values = this.values();
    const problems = state.checkSettings(values, this.limits);
    for (const [name, input] of Object.entries(inputs)) input.setAttribute("aria-invalid", String(name in problems));
    const wrong = Object.keys(problems)[0];
    if (wrong) {
      saved.textContent = `Not saved: ${inputs[wrong].labels[0].textContent}: ${problems[wrong]}`;
      inputs[wrong].focus();
      return;
    }
    state.saveSettings(values);
    saveApiKey(keyInput.value);
    saved.textContent = keyInput.value.trim() ? "Saved. The key is used from now on." : "Saved (no API key).";
    this.parts.onSaved();
  }
}
