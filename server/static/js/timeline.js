// A heat strip of per-frame relevance along the video's time axis, drawn on a canvas binned to its
// pixel width: an hour at 1 fps is 3,600 frames and a phone is 360 px wide, so a bar (or a button)
// per frame cannot work; one column per pixel, coloured and sized by the strongest frame in it, can.
// Hover shows the frame under the pointer (time, thumbnail, score); a click or the arrow keys seek.
// The canvas is one slider for assistive technology: its value is the frame the player is on.

import { formatTime, percent } from "./frames.js";

const HEIGHT = 32; // CSS px

function cssColour(el, name, fallback) {
  return getComputedStyle(el).getPropertyValue(name).trim() || fallback;
}

export class HeatStrip {
  /** options: label (accessible name), thumbSrc(index) → Promise<url>, onSeek(index, time). */
  constructor(container, { label, thumbSrc, onSeek }) {
    this.container = container;
    this.thumbSrc = thumbSrc;
    this.onSeek = onSeek;
    this.times = [];
    this.weights = null; // null: no answer yet, the strip just marks the sampled frames
    this.used = null;
    this.duration = 0;
    this.current = 0;
    this.owner = new Int32Array(0); // pixel bin -> the frame drawn there

    container.classList.add("heat");
    this.track = document.createElement("div");
    this.track.className = "heat-track";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "heat-canvas";
    this.canvas.tabIndex = 0;
    this.canvas.setAttribute("role", "slider");
    this.canvas.setAttribute("aria-label", label);
    this.canvas.setAttribute("aria-orientation", "horizontal");
    this.playhead = document.createElement("span");
    this.playhead.className = "heat-playhead";
    this.playhead.setAttribute("aria-hidden", "true");
    this.tip = document.createElement("div");
    this.tip.className = "heat-tip";
    this.tip.hidden = true;
    this.tip.setAttribute("aria-hidden", "true"); // the slider's value text says the same
    this.tipImg = document.createElement("img");
    this.tipImg.alt = "";
    this.tipText = document.createElement("span");
    this.tip.append(this.tipImg, this.tipText);
    this.track.append(this.canvas, this.playhead, this.tip);
    this.axis = document.createElement("div");
    this.axis.className = "axis";
    this.axis.setAttribute("aria-hidden", "true");
    container.append(this.track, this.axis);

    this.canvas.addEventListener("pointermove", (event) => this.hover(event));
    this.canvas.addEventListener("pointerleave", () => { this.tip.hidden = true; });
    this.canvas.addEventListener("click", (event) => this.pick(this.frameAt(event.offsetX)));
    this.canvas.addEventListener("keydown", (event) => this.key(event));
    // Redraw when the strip's width changes (window resize, panel collapse, phone rotation).
    new ResizeObserver(() => this.draw()).observe(this.track);
  }

  /** The sampled frames (seconds) and the video's length; clears any relevance. */
  setFrames(times, duration) {
    this.times = times.slice();
    const step = times.length > 1 ? times[times.length - 1] - times[times.length - 2] : 1;
    this.duration = Math.max(duration || 0, (times[times.length - 1] || 0) + step);
    this.weights = null;
    this.used = null;
    const ticks = [0, this.duration].map((t) => Object.assign(document.createElement("span"), { textContent: formatTime(t) }));
    this.axis.replaceChildren(...ticks);
    this.canvas.setAttribute("aria-valuemin", "0");
    this.canvas.setAttribute("aria-valuemax", String(Math.max(0, times.length - 1)));
    this.setCurrent(this.current);
    this.draw();
  }

  /** frames: [{index, time, weight, used}] from the service's relevance event. */
  setRelevance(frames) {
    const weights = new Float64Array(this.times.length);
    const used = new Uint8Array(this.times.length).fill(1);
    for (const frame of frames) {
      if (frame.index < 0 || frame.index >= weights.length) continue;
      weights[frame.index] = Number(frame.weight) || 0;
      if (frame.used === false) used[frame.index] = 0;
    }
    this.weights = weights;
    this.used = used;
    this.setCurrent(this.current);
    this.draw();
  }

  /** Bins of one CSS pixel; each takes the strongest frame whose time span touches it, preferring
   * frames the answer used over ones thinned out to fit the context. */
  bin(width) {
    const n = this.times.length;
    const owner = new Int32Array(width).fill(-1);
    const score = (i) => (this.weights ? this.weights[i] : 0) + (this.used && this.used[i] ? 2 : 0);
    for (let i = 0; i < n; i += 1) {
      const end = i + 1 < n ? this.times[i + 1] : this.duration;
      const b0 = Math.min(width - 1, Math.floor((this.times[i] / this.duration) * width));
      const b1 = Math.max(b0, Math.min(width - 1, Math.ceil((end / this.duration) * width) - 1));
      for (let b = b0; b <= b1; b += 1) {
        if (owner[b] < 0 || score(i) > score(owner[b])) owner[b] = i;
      }
    }
    // before the first sampled frame (a clip that starts later): that frame
    for (let b = 0; b < width && owner[b] < 0; b += 1) owner[b] = 0;
    return owner;
  }

  draw() {
    const width = Math.floor(this.track.clientWidth);
    if (!width || !this.times.length) return;
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(HEIGHT * dpr);
    this.canvas.style.height = `${HEIGHT}px`;
    this.owner = this.bin(width);
    this.canvas.dataset.bins = String(width);
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, HEIGHT);
    const hot = cssColour(this.canvas, "--heat-high", "#2f55d4");
    const cold = cssColour(this.canvas, "--heat-low", "#9aa9d9");
    const off = cssColour(this.canvas, "--heat-off", "#9aa0ab");
    let lo = Infinity;
    let hi = -Infinity;
    // the scale spans the frames the answer used: thinned-out ones (often weight 0) would flatten it
    const anyUsed = this.used && this.used.some((u) => u);
    if (this.weights) {
      this.weights.forEach((w, i) => {
        if (anyUsed && !this.used[i]) return;
        lo = Math.min(lo, w);
        hi = Math.max(hi, w);
      });
    }
    const spread = hi - lo;
    for (let b = 0; b < width; b += 1) {
      const i = this.owner[b];
      // level 0..1; every bin keeps at least a quarter of the height, so none is ever invisible
      const level = !this.weights ? 0 : spread > 1e-12 ? Math.max(0, Math.min(1, (this.weights[i] - lo) / spread)) : 1;
      const h = HEIGHT * (0.25 + 0.75 * level);
      ctx.fillStyle = this.used && !this.used[i] ? off : level >= 0.5 ? hot : cold;
      ctx.globalAlpha = 0.45 + 0.55 * level;
      ctx.fillRect(b, HEIGHT - h, 1, h);
    }
    ctx.globalAlpha = 1;
    this.movePlayhead();
  }

  frameAt(x) {
    if (!this.owner.length) return 0;
    return this.owner[Math.max(0, Math.min(this.owner.length - 1, Math.floor(x)))];
  }

  hover(event) {
    const i = this.frameAt(event.offsetX);
    if (i === undefined || i < 0) return;
    if (this.tip.dataset.index !== String(i)) {
      this.tip.dataset.index = String(i);
      this.tipImg.removeAttribute("src");
      this.thumbSrc(i).then((src) => { if (this.tip.dataset.index === String(i)) this.tipImg.src = src; }, () => {});
      this.tipText.textContent = this.describe(i);
    }
    this.tip.hidden = false;
    const room = this.track.clientWidth - this.tip.offsetWidth;
    this.tip.style.left = `${Math.max(0, Math.min(room, event.offsetX - this.tip.offsetWidth / 2))}px`;
  }

  describe(i) {
    const when = `${formatTime(this.times[i])} · frame ${i + 1} of ${this.times.length}`;
    if (!this.weights) return when;
    const left = this.used && !this.used[i] ? " (left out to fit the context)" : "";
    return `${when} · ${percent(this.weights[i])} of the attention${left}`;
  }

  key(event) {
    const steps = { ArrowRight: 1, ArrowUp: 1, ArrowLeft: -1, ArrowDown: -1, PageUp: 10, PageDown: -10 };
    const last = this.times.length - 1;
    let next;
    if (event.key in steps) next = this.current + steps[event.key];
    else if (event.key === "Home") next = 0;
    else if (event.key === "End") next = last;
    else return;
    event.preventDefault();
    this.pick(Math.max(0, Math.min(last, next)));
  }

  pick(i) {
    if (i === undefined || i < 0 || i >= this.times.length) return;
    this.setCurrent(i);
    this.onSeek(i, this.times[i]);
  }

  /** The frame the player is on (from the player's time updates, or a pick). */
  setCurrent(i) {
    this.current = Math.max(0, Math.min(this.times.length - 1, i || 0));
    if (!this.times.length) return;
    this.canvas.setAttribute("aria-valuenow", String(this.current));
    this.canvas.setAttribute("aria-valuetext", this.describe(this.current));
    this.movePlayhead();
  }

  movePlayhead() {
    const t = this.times[this.current] ?? 0;
    this.playhead.style.left = `${(100 * t) / (this.duration || 1)}%`;
  }
}
