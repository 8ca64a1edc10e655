// Prompts as annotation tools take them: left click = positive point, right click = negative point,
// left drag = the box (one box: a new drag replaces it). Every change is one undoable action.

const DRAG_PX = 5; // a press that moves less than this (screen pixels) is a click, not a box

/** The prompts of the current image, as a list of actions (undo pops the last one). */
export class PromptSet {
  constructor(onChange) {
    this.actions = [];
    this.onChange = onChange;
  }

  add(action) {
    this.actions.push(action);
    this.onChange();
  }

  undo() {
    if (this.actions.pop()) this.onChange();
  }

  clear() {
    if (this.actions.length) {
      this.actions = [];
      this.onChange();
    }
  }

  /** Forget everything without telling anyone (a new image). */
  reset() {
    this.actions = [];
  }

  get box() {
    for (let i = this.actions.length - 1; i >= 0; i -= 1) {
      if (this.actions[i].kind === "box") return this.actions[i].box;
    }
    return null;
  }

  get points() {
    return this.actions.filter((a) => a.kind === "point");
  }

  /** The /segment prompt fields, or null when there is nothing to ask. With a box, the points join
   * the box's prompt; without one, the points form one prompt (the server's rules). */
  request() {
    const body = {};
    const box = this.box;
    const points = this.points;
    if (box) body.boxes = [box.map((v) => Math.round(v * 10) / 10)];
    if (points.length) {
      body.points = points.map((p) => [Math.round(p.x * 10) / 10, Math.round(p.y * 10) / 10]);
      body.point_labels = points.map((p) => p.label);
    }
    return box || points.length ? body : null;
  }
}

function normalise(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

/** Turn pointer input on ``canvas`` (drawn at the image's size, shown scaled) into prompts in image
 * pixels: ``onPoint(x, y, label)``, ``onBox([x0, y0, x1, y1])``, and ``onDrag(box | null)`` while a box
 * is being drawn. */
export function attachPointer(canvas, { onPoint, onBox, onDrag }) {
  let start = null;

  const toImage = (e) => {
    const r = canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) * canvas.width) / r.width;
    const y = ((e.clientY - r.top) * canvas.height) / r.height;
    return [Math.min(Math.max(x, 0), canvas.width), Math.min(Math.max(y, 0), canvas.height)];
  };
  const dragged = (e) => Math.hypot(e.clientX - start.sx, e.clientY - start.sy) >= DRAG_PX;

  // Right click is a negative point here, not the browser's menu.
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 && e.button !== 2) return;
    e.preventDefault();
    canvas.focus({ preventScroll: true }); // the keyboard shortcuts then apply here
    canvas.setPointerCapture(e.pointerId);
    start = { button: e.button, sx: e.clientX, sy: e.clientY, at: toImage(e) };
  });
  canvas.addEventListener("pointermove", (e) => {
    if (start && start.button === 0 && dragged(e)) onDrag(normalise(start.at, toImage(e)));
  });
  canvas.addEventListener("pointerup", (e) => {
    if (!start) return;
    const s = start;
    start = null;
    if (s.button === 0 && Math.hypot(e.clientX - s.sx, e.clientY - s.sy) >= DRAG_PX) {
      onDrag(null);
      onBox(normalise(s.at, toImage(e)));
    } else {
      onPoint(s.at[0], s.at[1], s.button === 0 ? 1 : 0);
    }
  });
  canvas.addEventListener("pointercancel", () => {
    start = null;
    onDrag(null);
  });
}

/** Draw the prompts (and the box being dragged) on ``canvas``, at a constant on-screen size. */
export function drawPrompts(canvas, actions, drag) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const shown = canvas.getBoundingClientRect().width;
  const s = shown > 0 ? canvas.width / shown : 1; // image pixels per screen pixel
  const rect = (box, color, dash) => {
    ctx.setLineDash(dash ? [6 * s, 4 * s] : []);
    ctx.lineWidth = 4 * s;
    ctx.strokeStyle = "rgba(0, 0, 0, 0.6)";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.lineWidth = 2 * s;
    ctx.strokeStyle = color;
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  };
  let box = null;
  for (const a of actions) if (a.kind === "box") box = a.box;
  if (box) rect(box, "#ffe14d", false);
  if (drag) rect(drag, "#ffffff", true);
  ctx.setLineDash([]);
  for (const a of actions) {
    if (a.kind !== "point") continue;
    ctx.beginPath();
    ctx.arc(a.x, a.y, 5 * s, 0, Math.PI * 2);
    ctx.fillStyle = a.label ? "#00c853" : "#ff1744";
    ctx.fill();
    ctx.lineWidth = 2 * s;
    ctx.strokeStyle = "#ffffff";
    ctx.stroke();
    // a sign too, so the label does not rest on colour alone
    ctx.beginPath();
    ctx.moveTo(a.x - 2.5 * s, a.y);
    ctx.lineTo(a.x + 2.5 * s, a.y);
    if (a.label) {
      ctx.moveTo(a.x, a.y - 2.5 * s);
      ctx.lineTo(a.x, a.y + 2.5 * s);
    }
    ctx.lineWidth = 1.5 * s;
    ctx.stroke();
  }
}

/** One line per prompt, for the list next to the image. */
export function describe(action) {
  const r = (v) => Math.round(v);
  if (action.kind === "box") return `box ${action.box.map(r).join(", ")}`;
  return `${action.label ? "+" : "−"} point ${r(action.x)}, ${r(action.y)}`;
}
