// One side of the comparison: the image, the mask one route answered with, the prompts, and a line
// with the predicted IoU scores and the latency. Three canvases at the image's size, stacked.

const MASK_ALPHA = 120;

export class Panel {
  constructor(root) {
    this.root = root;
    this.stage = root.querySelector(".stage");
    this.image = root.querySelector("canvas.image");
    this.mask = root.querySelector("canvas.mask");
    this.prompts = root.querySelector("canvas.prompts");
    this.score = root.querySelector(".score");
    this.adapter = root.querySelector(".adapter");
    this.title = root.querySelector(".title");
    this.empty = root.querySelector(".empty");
    this.color = (root.dataset.color || "255,0,0").split(",").map(Number);
  }

  setTitle(text) {
    this.title.textContent = text;
  }

  setImage(source) {
    for (const c of [this.image, this.mask, this.prompts]) {
      c.width = source.width;
      c.height = source.height;
    }
    this.image.getContext("2d").drawImage(source, 0, 0);
    this.stage.style.aspectRatio = `${source.width} / ${source.height}`;
    // a tall image must not push the rest off a 800 px high window
    this.stage.style.maxWidth = `calc(56vh * ${source.width / source.height})`;
    this.stage.hidden = false;
    this.empty.hidden = true;
    this.showMask(null);
    this.adapter.textContent = "";
  }

  /** ``mask``: ``{width, height, data}`` (one byte per pixel, 1 = object), or null to clear. */
  showMask(mask) {
    const ctx = this.mask.getContext("2d");
    ctx.clearRect(0, 0, this.mask.width, this.mask.height);
    if (!mask) return;
    const img = ctx.createImageData(mask.width, mask.height);
    const [r, g, b] = this.color;
    for (let i = 0; i < mask.data.length; i += 1) {
      if (!mask.data[i]) continue;
      img.data[4 * i] = r;
      img.data[4 * i + 1] = g;
      img.data[4 * i + 2] = b;
      img.data[4 * i + 3] = MASK_ALPHA;
    }
    ctx.putImageData(img, 0, 0);
  }

  setNote(text, state = "") {
    this.score.className = `score ${state}`.trim();
    this.score.dataset.state = state || "idle";
    this.score.textContent = text;
  }

  setError(error) {
    this.showMask(null);
    this.setNote(String(error), "error");
  }

  /** The answer's scores (the shown mask's in bold) and the latency seen here and by the server. */
  setAnswer(answer, best, ms) {
    this.adapter.textContent = answer.adapter;
    this.score.className = "score";
    this.score.dataset.state = "ready";
    this.score.replaceChildren();
    const scores = answer.masks.map((m) => m.score);
    this.score.append("score ");
    scores.forEach((s, i) => {
      if (i) this.score.append(" / ");
      const span = document.createElement("span");
      span.textContent = s.toFixed(3);
      if (i === best && scores.length > 1) span.className = "best";
      this.score.append(span);
    });
    const server = answer.timings_ms && answer.timings_ms.total;
    this.score.append(` · ${Math.round(ms)} ms${server !== undefined ? ` (server ${server.toFixed(1)} ms)` : ""}`);
  }
}
