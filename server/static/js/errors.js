// API errors in plain words: a sentence a person can act on, plus the service's own message.

import { ApiError } from "./api.js";

const BY_CODE = {
  missing_api_key: "This service needs an API key. Enter it under Settings → API key, then try again.",
  invalid_api_key: "The service did not accept the API key. Check it under Settings → API key.",
  forbidden_address: "The service will not fetch that link: it points to a private or local network address.",
  invalid_url: "That link is not a web address the service can fetch (it must start with http:// or https://).",
  fetch_failed: "The service could not download that link.",
  fetch_timeout: "Downloading that link took too long.",
  upstream_status: "The site behind that link answered with an error.",
  too_many_redirects: "That link redirects too many times.",
  unsupported_media: "That link or file is not a video or image the service understands.",
  media_too_large: "That file is larger than this service accepts.",
  request_too_large: "That file is larger than this service accepts.",
  invalid_video: "The service could not read that file as a video.",
  invalid_image: "The service could not read that file as an image.",
  invalid_data_url: "The image could not be sent (its data was malformed).",
  video_too_long: "That video is longer than this service accepts.",
  empty_frame_range: "There are no frames to sample in that part of the video.",
  invalid_fps: "The frames-per-second setting is above this service's limit. Lower it under Settings.",
  invalid_max_frames: "Too many frames were asked for. Lower the frames-per-second setting.",
  invalid_max_tokens: "The longest-answer setting is above this service's limit. Lower it under Settings.",
  // Videos are thinned to fit the context, so what does not fit is the text: the conversation
  // (and the video's subtitles) leave no room for even one frame and an answer.
  context_length_exceeded:
    "The conversation is too long for the model's context. Ask a shorter question or start a new conversation.",
  audio_only: "That file is sound only, with no pictures. Load the video itself.",
  invalid_subtitles: "The service could not read those subtitles (SRT or WebVTT expected).",
  question_too_long: "The conversation has become too long. Start a new conversation.",
  too_many_messages: "The conversation has too many turns. Start a new conversation.",
  empty_question: "Type a question first.",
  video_not_found: "The service no longer knows this video. Load it again.",
  media_gone: "The service no longer keeps this video's file. Load it again.",
  queue_full: "The service is busy right now.",
  not_ready: "The service is still starting up (loading the model). Try again in a moment.",
  no_worker: "No model worker is running behind this service right now.",
};

const BY_STATUS = {
  400: "The service could not use that request.",
  401: "This service needs a valid API key. Enter it under Settings → API key.",
  403: "The service refused that request.",
  404: "The service could not find that.",
  408: "The request took too long.",
  413: "That is larger than this service accepts.",
  415: "The service does not accept that kind of file.",
  429: "The service is busy right now.",
  503: "The service is unavailable right now. Try again in a moment.",
};

/** {headline, detail} for any error: an ApiError, a failed video, or a bug in this page. */
export function plainWords(err) {
  if (!(err instanceof ApiError)) {
    return { headline: "Something went wrong in this page.", detail: String((err && err.message) || err) };
  }
  if (err.status === 0) {
    return {
      headline: "Could not reach the service. Check that it is running, then try again.",
      detail: err.message,
    };
  }
  let headline = BY_CODE[err.code] || BY_STATUS[err.status] ||
    (err.status >= 500 ? "The service ran into a problem on its side." : "The service could not do that.");
  if (err.status === 429 || err.code === "queue_full") {
    headline += err.retryAfter ? ` Try again in ${err.retryAfter} seconds.` : " Try again shortly.";
  }
  const said = err.message ? `The service said: “${err.message}”` : `HTTP status ${err.status}`;
  return { headline, detail: err.code ? `${said} (${err.code}, HTTP ${err.status})` : said };
}
