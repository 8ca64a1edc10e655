// Sample images drawn in the page, so it can be tried without an image file at hand. Seeded, so a
// sample is the same picture every time (and its embedding is found in the server's cache).

const SIZE = { width: 320, height: 240 };

/** A small deterministic PRNG (mulberry32): values in [0, 1). */
function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function noise(ctx, rand, amount) {
  const img = ctx.getImageData(0, 0, SIZE.width, SIZE.height);
  for (let i = 0; i < img.data.length; i += 4) {
    const d = (rand() - 0.5) * amount;
    img.data[i] += d;
    img.data[i + 1] += d;
    img.data[i + 2] += d;
  }
  ctx.putImageData(img, 0, 0);
}

function polyp(ctx, rand) {
  // mucosa: a warm gradient with folds, and one raised rounded lesion
  const bg = ctx.createRadialGradient(160, 120, 20, 160, 120, 220);
  bg.addColorStop(0, "#d9826f");
  bg.addColorStop(1, "#5a1f1a");
  ctx.fillStyle = bg;
  ctx.fillRect(0, 0, SIZE.width, SIZE.height);
  ctx.strokeStyle = "rgba(120, 40, 35, 0.5)";
  ctx.lineWidth = 6;
  for (let i = 0; i < 5; i += 1) {
    ctx.beginPath();
    ctx.arc(160, 120, 60 + i * 35 + rand() * 10, 0, Math.PI * 2);
    ctx.stroke();
  }
  const lesion = ctx.createRadialGradient(175, 105, 5, 185, 115, 55);
  lesion.addColorStop(0, "#f6c7b3");
  lesion.addColorStop(0.7, "#c9604d");
  lesion.addColorStop(1, "#8f3a2f");
  ctx.fillStyle = lesion;
  ctx.beginPath();
  ctx.ellipse(185, 115, 52, 42, 0.3, 0, Math.PI * 2);
  ctx.fill();
}

function shapes(ctx, rand) {
  ctx.fillStyle = "#8a9099";
  ctx.fillRect(0, 0, SIZE.width, SIZE.height);
  ctx.fillStyle = "#2a6fdb";
  ctx.beginPath();
  ctx.arc(90, 90, 45, 0, Math.PI * 2);
  ctx.fill();
  ctx.fillStyle = "#e0b020";
  ctx.fillRect(170, 40, 110, 70);
  ctx.fillStyle = "#2e9e58";
  ctx.beginPath();
  ctx.moveTo(120, 220);
  ctx.lineTo(200, 130);
  ctx.lineTo(280, 220);
  ctx.closePath();
  ctx.fill();
  noise(ctx, rand, 12);
}

function cells(ctx, rand) {
  ctx.fillStyle = "#14161f";
  ctx.fillRect(0, 0, SIZE.width, SIZE.height);
  for (let i = 0; i < 14; i += 1) {
    const x = 20 + rand() * 280;
    const y = 20 + rand() * 200;
    const r = 10 + rand() * 18;
    const g = ctx.createRadialGradient(x, y, 1, x, y, r);
    g.addColorStop(0, "#b8f0c8");
    g.addColorStop(1, "#2c7a4a");
    ctx.fillStyle = g;
    ctx.beginPath();
    ctx.ellipse(x, y, r, r * (0.6 + rand() * 0.4), rand() * Math.PI, 0, Math.PI * 2);
    ctx.fill();
  }
}

const DRAW = { polyp: [polyp, 1], shapes: [shapes, 2], cells: [cells, 3] };
export const SAMPLE_NAMES = Object.keys(DRAW);

/** A canvas with the named sample drawn on it. */
export function sample(name) {
  const [draw, seed] = DRAW[name] || DRAW.polyp;
  const canvas = document.createElement("canvas");
  canvas.width = SIZE.width;
  canvas.height = SIZE.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  draw(ctx, random(seed));
  return canvas;
}
