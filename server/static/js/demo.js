// What the page says about the demo models: the banner, the sentence under each answer, and the
// example questions a demo clip was made for (POST /v1/demo/clip returns them with the clip).

const BANNER = {
  random: "Demo model with random weights: its answers are noise, not descriptions of your video.",
  trained: "Demo model, trained only on synthetic videos of coloured shapes: it cannot describe real footage.",
};

/** The banner's sentence for a model entry of /v1/models, or "" for a real checkpoint. */
export function bannerText(info) {
  return BANNER[info.demo] || info.warning || "";
}

/** How far to trust one answer. examples: the questions of the demo clip on screen (null for other videos). */
export function caveat(demo, examples, question) {
  if (demo === "random") return "Random demo weights: this answer is noise, whatever the video shows.";
  if (demo !== "trained") return "";
  if (!examples) {
    return "Demo model: it knows only synthetic clips of coloured shapes; about any other footage this answer is a guess.";
  }
  const known = examples.find((example) => example.question === question.trim());
  return known ? `This clip was made for this question: the right answer is “${known.answer}”.`
    : "The demo model knows only questions like the examples below: colours, shapes, counts, what appears or disappears.";
}

/** One button per example question; onPick(question) asks it. */
export function renderExamples(box, list, questions, onPick) {
  list.replaceChildren();
  box.hidden = !(questions && questions.length);
  for (const { question } of questions || []) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "chip example";
    button.textContent = question;
    button.addEventListener("click", () => onPick(question));
    list.append(button);
  }
}
