// The conversation: each question is POSTed to /v1/chat/completions with the whole history
// and streamed back token by token. Stopping aborts the fetch; the service cancels the
// generation when the connection closes. Every finished turn is kept as a plain record, so the
// conversation can be saved (session storage) and drawn again after a reload.

import { api, ApiError } from "./api.js";
import { plainWords } from "./errors.js";
import { renderRelevance } from "./frames.js";
import { sseData } from "./sse.js";

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** One question and its answer in the log. */
class Turn {
  constructor(list, question) {
    this.record = { question, answer: "", state: "streaming", meta: "", error: null, relevance: null, caveat: "" };
    const asked = element("li", "turn user");
    asked.append(element("p", "who", "You"), element("p", "text", question));
    this.item = element("li", "turn assistant");
    this.item.dataset.state = "streaming";
    this.item.setAttribute("aria-busy", "true");
    this.status = element("p", "answer-status", "Thinking…");
    this.textEl = element("div", "answer-text");
    this.text = document.createTextNode("");
    this.textEl.append(this.text);
    this.relevance = element("div", "relevance");
    this.relevance.hidden = true;
    this.meta = element("p", "answer-meta");
    this.item.append(element("p", "who", "LLaMA-VID"), this.status, this.textEl, this.relevance, this.meta);
    list.append(asked, this.item);
  }

  append(piece) {
    if (!this.status.hidden) this.status.hidden = true;
    this.text.appendData(piece);
    this.record.answer += piece;
  }

  finish(state, meta) {
    this.item.dataset.state = state;
    this.item.removeAttribute("aria-busy");
    this.status.hidden = true;
    this.meta.textContent = meta;
    Object.assign(this.record, { state, meta });
  }

  error(words, live = true) {
    const box = element("div", "answer-error");
    if (live) box.setAttribute("role", "alert");
    box.append(element("p", "error-headline", words.headline), element("p", "error-detail", words.detail || ""));
    this.item.insertBefore(box, this.meta);
    this.record.error = { headline: words.headline, detail: words.detail || "" };
  }

  /** A sentence under the answer about how far to trust it (what the demo model knows). */
  caveat(text) {
    if (!text) return;
    this.item.insertBefore(element("p", "answer-caveat", text), this.meta);
    this.record.caveat = text;
  }
}

export class Chat {
  /** hooks: media (Media), sampling() → request fields, onBusy(bool), onAuthError(), announce(text),
   * caveat(question) → a sentence on how far to trust the answer (or ""), onSave() after every turn. */
  constructor(hooks) {
    this.hooks = hooks;
    this.list = document.getElementById("messages");
    this.empty = document.getElementById("empty-chat");
    this.history = []; // {role, content: string}, alternating, oldest first
    this.records = []; // one per turn shown, see Turn.record
    this.controller = null;
    this.epoch = 0; // bumped by reset()
    this.pinned = true; // the log follows new text while its end is in view
    this.scrollQueued = false;
    this.list.addEventListener("scroll", () => {
      this.pinned = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 48;
    }, { passive: true });
  }

  get busy() {
    return this.controller !== null;
  }

  reset() {
    this.stop();
    this.epoch += 1; // an answer still winding down must not join the new conversation
    this.history = [];
    this.records = [];
    this.list.replaceChildren();
    this.empty.hidden = false;
  }

  /** What to save: enough to draw the conversation again and to continue it. */
  snapshot() {
    return { history: this.history, turns: this.records.filter((r) => r.state !== "streaming") };
  }

  /** Draw a saved conversation again (after a reload). */
  restore(saved) {
    this.reset();
    if (!saved || !Array.isArray(saved.turns)) return;
    this.history = Array.isArray(saved.history) ? saved.history : [];
    for (const record of saved.turns) {
      const turn = new Turn(this.list, record.question);
      if (record.answer) turn.append(record.answer);
      if (record.relevance) this.showRelevance(turn, record.relevance, record.question);
      if (record.error) turn.error(record.error, false);
      turn.caveat(record.caveat);
      turn.finish(record.state, record.meta);
      this.records.push(turn.record);
    }
    this.empty.hidden = this.records.length > 0;
    this.list.scrollTop = this.list.scrollHeight;
  }

  showRelevance(turn, relevance, question) {
    const { media } = this.hooks;
    turn.record.relevance = relevance;
    renderRelevance(turn.relevance, relevance.frames, relevance.moments, media.thumbSrc,
      (index, time) => media.seek(index, time), (media.video && media.video.duration) || 0);
    media.showRelevance(relevance.frames, question);
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  messages(question) {
    const part = this.hooks.media.part();
    const turns = [...this.history, { role: "user", content: question }];
    return turns.map((turn, i) =>
      i === 0 && part ? { role: "user", content: [part, { type: "text", text: turn.content }] } : turn);
  }

  async ask(question) {
    if (this.busy || !question.trim()) return false;
    const { media } = this.hooks;
    if (!media.part()) return false; // nothing attached: an answer would be about nothing
    const body = {
      messages: this.messages(question),
      stream: true,
      stream_options: { include_usage: true },
      ...this.hooks.sampling(),
    };
    if (media.isVideo()) body.relevance = true;
    this.empty.hidden = true;
    this.pinned = true;
    const turn = new Turn(this.list, question);
    this.records.push(turn.record);
    turn.item.scrollIntoView({ block: "nearest" });
    const controller = new AbortController();
    const epoch = this.epoch;
    this.controller = controller;
    this.hooks.onBusy(true);
    const started = performance.now();
    let text = "";
    let finish = null;
    let usage = null;
    let frames = null; // frames_used / frames_total, from the finish chunk of a video answer
    let failure = null;
    let stopped = false;
    try {
      const response = await api("/v1/chat/completions", { method: "POST", json: body, signal: controller.signal });
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          continue;
        }
        if (chunk.error) {
          failure = new ApiError(500, chunk.error);
          break;
        }
        const extension = chunk.llamavid;
        if (extension && extension.type === "progress") {
          turn.status.textContent =
            `Waiting for the video: ${extension.frames_done} / ${extension.frames_total ?? "?"} frames extracted…`;
        } else if (extension && extension.type === "relevance" && extension.frames && extension.frames.length) {
          const relevance = { frames: extension.frames, moments: extension.moments || null };
          this.follow(() => this.showRelevance(turn, relevance, question));
        } else if (extension && extension.frames_total) {
          frames = extension;
        }
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (choice) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            text += piece;
            this.follow(() => turn.append(piece));
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    } catch (err) {
      if (err && err.name === "AbortError") stopped = true;
      else failure = err;
    } finally {
      if (this.controller === controller) this.controller = null;
      this.hooks.onBusy(false);
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (!failure && !stopped && finish === null) {
      failure = { headline: "The connection to the service closed before the answer finished.",
        detail: "The service may have restarted. Ask again." };
    }
    if (text && !failure && epoch === this.epoch) {
      this.history.push({ role: "user", content: question }, { role: "assistant", content: text });
    }
    if (failure) {
      const words = failure.headline ? failure : plainWords(failure);
      turn.error(words);
      turn.finish("error", text ? "The answer was cut short by the error above." : "");
      this.hooks.announce(`The question failed. ${words.headline}`);
      if (failure.status === 401) this.hooks.onAuthError();
    } else if (stopped) {
      turn.finish("stopped", `Stopped by you after ${seconds} s.` +
        (text ? "" : " No answer yet, so this question is not part of the conversation."));
      this.hooks.announce("Answer stopped.");
    } else {
      const empty = text ? "" : "The model gave an empty answer. ";
      this.follow(() => {
        turn.caveat(this.hooks.caveat(question));
        turn.finish("done", empty + this.summary(finish, usage, seconds, body.max_tokens, frames));
      });
      this.hooks.announce("Answer finished.");
    }
    if (epoch === this.epoch) this.hooks.onSave();
    return true;
  }

  /** Run a change to the log and keep it scrolled to the end, unless the reader scrolled up (wide screens,
   * where the log scrolls by itself). At most one scroll per frame, however fast tokens arrive. */
  follow(change) {
    change();
    if (!this.pinned || this.scrollQueued) return;
    this.scrollQueued = true;
    requestAnimationFrame(() => {
      this.scrollQueued = false;
      if (this.pinned) this.list.scrollTop = this.list.scrollHeight;
    });
  }

  summary(finish, usage, seconds, maxTokens, frames) {
    const parts = [finish === "length"
      ? `Reached the longest-answer limit${maxTokens ? ` (${maxTokens} tokens)` : ""}` : "Done"];
    parts.push(`${seconds} s`);
    if (usage) {
      parts.push(`${usage.completion_tokens} tokens`);
      const visual = usage.visual_tokens ?? (usage.prompt_tokens_details || {}).visual_tokens;
      if (visual) parts.push(`${visual} visual tokens`);
    }
    if (frames && frames.frames_used < frames.frames_total) {
      parts.push(`used ${frames.frames_used} of ${frames.frames_total} frames (thinned to fit the context)`);
    }
    return parts.join(" · ");
  }
}
