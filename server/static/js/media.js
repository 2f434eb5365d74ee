// What the conversation is about: a video (uploaded or linked, registered with the service and
// extracted in the background while this page polls its status) or an image (sent inline,
// as a data: URL or a link, with each question).

import { api, getJSON, mediaSrc, forgetMedia, uploadFile } from "./api.js";
import { formatTime, makeRoving, markCurrent, renderStrip } from "./frames.js";
import { HeatStrip } from "./timeline.js";

const IMAGE_LINK = /\.(png|jpe?g|gif|webp|bmp)$/i;
const MAX_IMAGE_BYTES = 32 * 1024 * 1024;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function isImageFile(file) {
  return file.type ? file.type.startsWith("image/") : IMAGE_LINK.test(file.name);
}

export class Media {
  /** hooks: fps() for new videos, onChange() when the subject changes, onError(err), announce(text),
   * framesThatFit() → about how many frames one question can use (null when unknown). */
  constructor(hooks) {
    this.hooks = hooks;
    this.statusText = document.getElementById("status-text");
    this.progress = document.getElementById("progress");
    this.viewer = document.getElementById("viewer");
    this.player = document.getElementById("player");
    this.image = document.getElementById("image-preview");
    this.note = document.getElementById("player-note");
    this.frames = document.getElementById("frames");
    this.strip = document.getElementById("frame-strip");
    this.kind = null; // "video" | "image" | null
    this.relevance = null; // the last answer's {frames, question}, drawn on the scrubber
    this.video = null; // the service's VideoObject
    this.imageUrl = null;
    this.localUrl = null;
    this.generation = 0; // bumped on every new subject, so stale polls and uploads stop
    makeRoving(this.strip);
    this.player.addEventListener("error", () => {
      if (this.kind !== "video") return;
      this.note.textContent = "This browser cannot play this video's format. The frames and answers still work.";
      this.note.hidden = false;
    });
    this.player.addEventListener("timeupdate", () => this.followPlayer());
    this.thumbSrc = (index) => mediaSrc(`/v1/videos/${encodeURIComponent(this.video.id)}/frames/${index}.jpg`);
    // The scrubber's heat strip, right under the player: the last answer's relevance over the whole video.
    this.timeline = document.getElementById("timeline");
    this.timelineNote = document.getElementById("timeline-note");
    this.heat = new HeatStrip(document.getElementById("timeline-strip"), {
      label: "Video timeline: relevance of each moment to the last answer",
      thumbSrc: this.thumbSrc,
      onSeek: (index, time) => this.seek(index, time),
    });
  }

  /** Colour the scrubber's strip with an answer's relevance. */
  showRelevance(frames, question) {
    if (!this.isVideo()) return;
    this.relevance = { frames, question }; // kept: a restored conversation can arrive before the frames do
    if (this.video.status !== "ready") return;
    this.heat.setRelevance(frames);
    this.timelineNote.textContent = `Relevance to “${question}”: taller and darker where the answer looked.`;
  }

  /** The content part for the first user message, or null when nothing is loaded. */
  part() {
    if (this.kind === "video" && this.video) return { type: "video_url", video_url: { url: this.video.id } };
    if (this.kind === "image" && this.imageUrl) return { type: "image_url", image_url: { url: this.imageUrl } };
    return null;
  }

  isVideo() {
    return this.kind === "video" && this.video !== null;
  }

  async loadFile(file) {
    const generation = this.reset();
    if (isImageFile(file)) {
      if (file.size > MAX_IMAGE_BYTES) {
        this.hooks.onError({ headline: "That image is larger than 32 MiB, the most the service accepts inline.",
          detail: `${file.name}: ${(file.size / 1048576).toFixed(1)} MiB` });
        this.setStatus("No video yet.");
        return;
      }
      const dataUrl = await readAsDataURL(file);
      if (generation === this.generation) this.showImage(dataUrl, file.name);
      return;
    }
    this.localUrl = URL.createObjectURL(file);
    this.setStatus(`Uploading ${file.name}…`, 0);
    try {
      const video = await uploadFile("/v1/videos", file, { fps: this.hooks.fps() }, (fraction) => {
        if (generation === this.generation) this.setStatus(`Uploading ${file.name}: ${Math.round(fraction * 100)}%`, fraction);
      });
      if (generation === this.generation) await this.track(video, generation, this.localUrl);
    } catch (err) {
      if (generation === this.generation) this.fail(err);
    }
  }

  async loadUrl(url) {
    const generation = this.reset();
    let path = "";
    try {
      path = new URL(url).pathname;
    } catch {
      // the service will say what is wrong with it
    }
    if (IMAGE_LINK.test(path)) {
      this.showImage(url, url);
      return;
    }
    this.setStatus("Asking the service to fetch the video…", 0);
    try {
      const fps = this.hooks.fps();
      const video = await getJSON("/v1/videos", { method: "POST", json: fps ? { url, fps } : { url } });
      if (generation === this.generation) await this.track(video, generation, null);
    } catch (err) {
      if (generation === this.generation) this.fail(err);
    }
  }

  /** A video the service already has (the id in the page's address, after a reload). */
  async loadById(id) {
    const generation = this.reset();
    this.setStatus("Loading the video from the last visit…", 0);
    try {
      const video = await getJSON(`/v1/videos/${encodeURIComponent(id)}`);
      if (generation === this.generation) await this.track(video, generation, null);
    } catch (err) {
      if (generation === this.generation) this.fail(err);
    }
  }

  /** Ask the service for a demo clip; resolves to its record (with the questions it was made for), or null. */
  async loadDemo() {
    const generation = this.reset();
    this.setStatus("Making a demo clip…", 0);
    try {
      const clip = await getJSON("/v1/demo/clip", { method: "POST" });
      if (generation !== this.generation) return null;
      this.track(clip, generation, null);
      return clip;
    } catch (err) {
      if (generation === this.generation) this.fail(err);
      return null;
    }
  }

  /** Forget the current subject; returns the new generation. */
  reset() {
    this.generation += 1;
    if (this.localUrl) URL.revokeObjectURL(this.localUrl);
    forgetMedia();
    this.localUrl = null;
    this.kind = null;
    this.video = null;
    this.imageUrl = null;
    this.player.removeAttribute("src");
    this.player.load();
    this.image.removeAttribute("src");
    this.viewer.hidden = true;
    this.frames.hidden = true;
    this.timeline.hidden = true;
    this.relevance = null;
    this.note.hidden = true;
    this.strip.replaceChildren();
    this.hooks.onChange();
    return this.generation;
  }

  setStatus(text, fraction = null) {
    this.statusText.textContent = text;
    this.progress.hidden = fraction === null;
    if (fraction !== null) this.progress.value = Math.max(0, Math.min(1, fraction));
  }

  fail(err) {
    this.setStatus("Nothing loaded: see the message above.");
    this.hooks.onError(err);
  }

  showImage(src, name) {
    this.kind = "image";
    this.imageUrl = src;
    this.image.src = src;
    this.image.hidden = false;
    this.player.hidden = true;
    this.viewer.hidden = false;
    const remote = !src.startsWith("data:");
    this.setStatus(remote ? `Image link set: the service fetches it when you ask. (${name})` : `Image ready: ${name}`);
    this.hooks.announce("Image ready. Ask a question about it.");
    this.hooks.onChange();
  }

  /** The video's subtitles (uploaded with it, or its own text track) as a track on the player;
   * fetched, not linked, so that a key set under Settings is sent (a 404: it has none). */
  showSubtitles(video, generation) {
    for (const old of this.player.querySelectorAll("track")) old.remove();
    api(`/v1/videos/${encodeURIComponent(video.id)}/subtitles.vtt`)
      .then((response) => response.blob())
      .then((blob) => {
        if (generation !== this.generation) return;
        const track = document.createElement("track");
        Object.assign(track, { kind: "subtitles", label: "Subtitles", default: true, src: URL.createObjectURL(blob) });
        this.player.append(track);
      }, () => {});
  }

  async track(video, generation, localSrc) {
    this.kind = "video";
    this.video = video;
    this.hooks.onChange();
    this.player.hidden = false;
    this.image.hidden = true;
    this.viewer.hidden = false;
    const content = `/v1/videos/${encodeURIComponent(video.id)}/content`;
    Promise.resolve(localSrc || mediaSrc(content)).then(
      (src) => { if (generation === this.generation) this.player.src = src; },
      () => { this.note.textContent = "The video itself could not be loaded for playback."; this.note.hidden = false; });
    this.showSubtitles(video, generation);
    let delay = 200;
    for (;;) {
      this.showProgress(video);
      if (video.status === "ready") return this.ready(video);
      if (video.status === "failed") {
        const error = video.error || {};
        this.setStatus("The video could not be used.");
        this.kind = null; // nothing attached: questions would be about nothing
        this.video = null;
        this.hooks.onChange();
        this.hooks.onError({ headline: "The service could not extract frames from this video.",
          detail: `The service said: “${error.message || "unknown error"}”${error.code ? ` (${error.code})` : ""}` });
        return undefined;
      }
      await sleep(delay);
      delay = Math.min(1000, delay * 1.5);
      if (generation !== this.generation) return undefined;
      try {
        video = await getJSON(`/v1/videos/${encodeURIComponent(video.id)}`);
      } catch (err) {
        if (generation === this.generation) this.fail(err);
        return undefined;
      }
      if (generation !== this.generation) return undefined;
      this.video = video;
    }
  }

  showProgress(video) {
    const total = video.frames_total ?? "?";
    const done = video.frames_done ?? 0;
    const fraction = video.frames_total ? done / video.frames_total : 0;
    if (video.status === "queued") this.setStatus(`Waiting to extract frames: ${done} / ${total}`, fraction);
    else if (video.status === "extracting") this.setStatus(`Extracting frames: ${done} / ${total}`, fraction);
    else if (video.status === "ready") {
      const length = video.duration ? ` from ${formatTime(video.duration)} of video` : "";
      this.setStatus(`Ready: ${total} / ${total} frames extracted${length}.`, 1);
    }
  }

  ready(video) {
    const times = video.timestamps || [];
    renderStrip(this.strip, times, this.thumbSrc, (index, time) => this.seek(index, time));
    this.frames.hidden = times.length === 0;
    this.timeline.hidden = times.length === 0;
    this.heat.setFrames(times, video.duration);
    const fit = this.hooks.framesThatFit ? this.hooks.framesThatFit() : null;
    this.timelineNote.textContent = `${times.length} sampled frames. Ask a question to see where the answer looked.` +
      (fit && times.length > fit ? ` The model's context holds about ${fit} of them: each answer uses that many, ` +
        "evenly spaced." : "");
    if (this.relevance) this.showRelevance(this.relevance.frames, this.relevance.question);
    this.hooks.announce(`Video ready: ${times.length} frames. Ask a question about it.`);
  }

  /** Jump the player to a sampled frame. */
  seek(index, time) {
    if (this.kind !== "video") return;
    this.player.currentTime = time;
    markCurrent(index);
    this.heat.setCurrent(index);
    // On a phone the answers sit below the player: bring it back into view to show the seek.
    const box = this.player.getBoundingClientRect();
    if (box.top < 0 || box.bottom > window.innerHeight) {
      this.player.scrollIntoView({ block: "nearest", behavior: matchMedia("(prefers-reduced-motion: reduce)").matches ? "auto" : "smooth" });
    }
  }

  followPlayer() {
    const times = (this.video && this.video.timestamps) || [];
    if (!times.length) return;
    const t = this.player.currentTime + 1e-3;
    let index = 0;
    while (index + 1 < times.length && times[index + 1] <= t) index += 1;
    markCurrent(index);
    this.heat.setCurrent(index);
  }
}
