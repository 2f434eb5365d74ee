// Server-sent events from a fetch() response body (EventSource cannot POST).
// Yields each event's data as a string; comment lines (": ping") are skipped.

function dataOf(block) {
  const lines = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("data:")) lines.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return lines.length ? lines.join("\n") : null;
}

export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = ""; // text with line endings normalised to \n
  let carry = ""; // a trailing \r that may be the first half of \r\n
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let text = carry + value;
      carry = text.endsWith("\r") ? "\r" : "";
      if (carry) text = text.slice(0, -1);
      pending += text.replace(/\r\n?/g, "\n");
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const data = dataOf(pending.slice(0, end));
        pending = pending.slice(end + 2);
        if (data !== null) yield data;
      }
    }
    const last = dataOf((pending + carry).replace(/\r\n?/g, "\n").trim());
    if (last !== null) yield last;
  } finally {
    reader.cancel().catch(() => {}); // stops the download when the reader leaves early
  }
}
