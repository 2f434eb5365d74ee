// The strip of sampled frames and the relevance timeline under each answer. Both are toolbars
// of buttons with one tab stop: arrow keys, Home and End move between frames, Enter or Space
// jumps the player there. Every frame button carries data-index and data-time. Past MAX_BARS
// frames an answer's timeline is a heat strip (timeline.js) instead of bars.

import { HeatStrip } from "./timeline.js";

export function formatTime(seconds) {
  const tenths = Math.round(Math.max(0, seconds) * 10);
  const whole = Math.floor(tenths / 10);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = String(whole % 60).padStart(2, "0");
  const frac = tenths % 10 ? `.${tenths % 10}` : "";
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}${frac}` : `${m}:${s}${frac}`;
}

export function percent(weight) {
  const p = weight * 100;
  if (p >= 99.95) return "100%";
  return p > 0 && p < 0.1 ? `${p.toPrecision(2)}%` : `${p.toFixed(1)}%`; // an hour of frames: 0.028% each
}

/** One tab stop per toolbar; arrow keys move the focus between its frame buttons. */
export function makeRoving(toolbar) {
  const keys = { ArrowRight: 1, ArrowLeft: -1, PageDown: 10, PageUp: -10 };
  toolbar.setAttribute("aria-orientation", "horizontal");
  toolbar.addEventListener("keydown", (event) => {
    const items = [...toolbar.querySelectorAll("button.frame-button")];
    const current = items.indexOf(document.activeElement);
    if (current < 0 || !items.length) return;
    let next;
    if (event.key in keys) next = Math.min(items.length - 1, Math.max(0, current + keys[event.key]));
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = items.length - 1;
    else return;
    event.preventDefault();
    items[current].tabIndex = -1;
    items[next].tabIndex = 0;
    items[next].focus();
  });
  toolbar.addEventListener("focusin", (event) => {
    const target = event.target.closest("button.frame-button");
    if (!target) return;
    for (const item of toolbar.querySelectorAll("button.frame-button")) item.tabIndex = item === target ? 0 : -1;
  });
}

/** Load a thumbnail only once it scrolls near the view (a video may have hundreds of frames). */
const lazy = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    lazy.unobserve(entry.target);
    const load = entry.target._load;
    delete entry.target._load;
    if (load) load();
  }
}, { rootMargin: "200px" });

function thumbnail(index, thumbSrc, className) {
  const img = document.createElement("img");
  img.className = className;
  img.alt = "";
  img.decoding = "async";
  img._load = () =>
    thumbSrc(index).then((src) => { img.src = src; }, () => img.classList.add("broken"));
  lazy.observe(img);
  return img;
}

function frameButton(index, time, label) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "frame-button";
  button.dataset.index = String(index);
  button.dataset.time = String(time);
  button.tabIndex = -1;
  button.setAttribute("aria-label", label);
  button.title = label;
  return button;
}

/** Thumbnails of the sampled frames, in order. */
export function renderStrip(toolbar, timestamps, thumbSrc, onPick) {
  toolbar.replaceChildren();
  timestamps.forEach((time, index) => {
    const button = frameButton(index, time, `Frame ${index + 1} of ${timestamps.length}, at ${formatTime(time)}`);
    button.classList.add("thumb");
    const caption = document.createElement("span");
    caption.className = "thumb-time";
    caption.textContent = formatTime(time);
    button.append(thumbnail(index, thumbSrc, "thumb-img"), caption);
    button.addEventListener("click", () => onPick(index, time));
    toolbar.append(button);
  });
  if (toolbar.firstElementChild) toolbar.firstElementChild.tabIndex = 0;
}

let timelines = 0;
// Past this many frames a bar per frame gets too thin to see or hit: the answer gets a heat strip.
export const MAX_BARS = 40;

function bars(frames, id, lo, spread, withThumbs, thumbSrc, onPick) {
  const bars = document.createElement("div");
  bars.className = "bars" + (withThumbs ? " with-thumbs" : "");
  bars.setAttribute("role", "toolbar");
  bars.setAttribute("aria-labelledby", id);
  bars.style.setProperty("--n", String(frames.length));
  for (const frame of frames) {
    const weight = Number(frame.weight) || 0;
    const height = spread > 1e-12 ? 0.12 + (0.88 * (weight - lo)) / spread : 1;
    const unused = frame.used === false;
    const button = frameButton(frame.index, frame.time,
      `${formatTime(frame.time)}, frame ${frame.index + 1}: ${percent(weight)} of the attention` +
      (unused ? " (left out to fit the model's context)" : ""));
    button.classList.add("bar");
    if (unused) button.classList.add("unused");
    button.style.setProperty("--h", height.toFixed(3));
    const track = document.createElement("span");
    track.className = "bar-track";
    const fill = document.createElement("span");
    fill.className = "bar-fill";
    track.append(fill);
    button.append(track);
    if (withThumbs) button.append(thumbnail(frame.index, thumbSrc, "bar-thumb"));
    button.addEventListener("click", () => onPick(frame.index, frame.time));
    bars.append(button);
  }
  if (bars.firstElementChild) bars.firstElementChild.tabIndex = 0;
  makeRoving(bars);

  const axis = document.createElement("div");
  axis.className = "axis";
  axis.setAttribute("aria-hidden", "true");
  for (const frame of [frames[0], frames[frames.length - 1]]) {
    const tick = document.createElement("span");
    tick.textContent = frame ? formatTime(frame.time) : "";
    axis.append(tick);
  }

  const box = document.createElement("div");
  box.append(bars, axis);
  return box;
}

/** The relevance of each frame to one question: a bar per frame, tallest where attention went,
 * dimmed where the frame was thinned out to fit the context, and the moments it adds up to. */
export function renderRelevance(container, frames, moments, thumbSrc, onPick, duration = 0) {
  const id = `relevance-${++timelines}`;
  const weights = frames.map((f) => Number(f.weight) || 0);
  const lo = Math.min(...weights);
  const hi = Math.max(...weights);
  const spread = hi - lo;
  const withThumbs = frames.length <= 16;

  const title = document.createElement("p");
  title.className = "relevance-title";
  title.id = id;
  title.textContent = "Where this answer looked: relevance of each frame";

  let strip;
  if (frames.length > MAX_BARS) {
    strip = document.createElement("div");
    strip.className = "answer-heat";
    const heat = new HeatStrip(strip, { label: "Relevance of each moment to this answer", thumbSrc, onSeek: onPick });
    heat.setFrames(frames.map((f) => f.time), duration);
    heat.setRelevance(frames);
  } else {
    strip = bars(frames, id, lo, spread, withThumbs, thumbSrc, onPick);
  }

  const summary = document.createElement("div");
  summary.className = "relevance-summary";
  if (frames.length > 1) {
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = hi > 0 && spread / hi < 0.05
      ? `All frames weigh about the same here (about ${percent(1 / frames.length)} each): ` +
        "the heights magnify tiny differences."
      : `Heights run from the least (${percent(lo)}) to the most relevant frame (${percent(hi)}).`;
    summary.append(note);
  }
  const label = document.createElement("span");
  const chips = document.createElement("span");
  chips.className = "chips";
  const chip = (index, time, text, aria) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip";
    button.dataset.index = String(index);
    button.dataset.time = String(time);
    button.append(thumbnail(index, thumbSrc, "chip-thumb"), document.createTextNode(text));
    button.setAttribute("aria-label", aria);
    button.addEventListener("click", () => onPick(index, time));
    chips.append(button);
  };
  if (moments && moments.length) {
    label.textContent = "Moments:";
    for (const moment of moments) {
      const time = (frames[moment.frame] || {}).time ?? moment.start;
      const span = `${formatTime(moment.start)}–${formatTime(moment.end)}`;
      chip(moment.frame, time, `${span} · ${percent(moment.score)}`,
        `Jump to the moment ${span} (${percent(moment.score)} of the attention)`);
    }
  } else {
    label.textContent = "Most relevant:";
    const top = [...frames].sort((a, b) => b.weight - a.weight).slice(0, Math.min(3, frames.length));
    for (const frame of top) {
      chip(frame.index, frame.time, `${formatTime(frame.time)} · ${percent(frame.weight)}`,
        `Jump to ${formatTime(frame.time)} (${percent(frame.weight)} of the attention)`);
    }
  }
  const line = document.createElement("p");
  line.className = "top-frames";
  line.append(label, chips);
  summary.append(line);

  container.replaceChildren(title, strip, summary);
  container.hidden = false;
}

/** Show which frame the player is on, in the strip and in every timeline. */
export function markCurrent(index) {
  for (const el of document.querySelectorAll("[data-index][aria-current]")) {
    if (el.dataset.index !== String(index)) el.removeAttribute("aria-current");
  }
  if (index === null || index === undefined) return;
  for (const el of document.querySelectorAll(`.frame-button[data-index="${index}"]`)) {
    el.setAttribute("aria-current", "true");
  }
}
