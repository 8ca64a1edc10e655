// COCO run-length encoding, as the server answers masks (pycocotools' format): counts of alternating
// 0 and 1 runs, starting with 0, over the pixels in column-major order. The compressed string form
// packs each count in 5-bit groups (6 bits per character from "0" up; bit 5 = "more follows",
// bit 4 of the last group = sign) and stores counts after the second as differences from the count
// two before: the same decoding as pycocotools' rleFrString.

/** The counts of a compressed COCO RLE string. */
export function countsFromString(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0;
    let k = 0;
    let more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p += 1;
      k += 1;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** `{size: [h, w], counts}` -> `{width, height, data}`: one byte per pixel, row-major, 1 = object. */
export function decodeRle(rle) {
  const [height, width] = rle.size;
  const counts = typeof rle.counts === "string" ? countsFromString(rle.counts) : rle.counts;
  const data = new Uint8Array(width * height);
  let i = 0; // position in column-major order
  let value = 0;
  for (const n of counts) {
    if (value) {
      for (let j = i; j < i + n; j += 1) {
        const x = Math.floor(j / height);
        data[(j - x * height) * width + x] = 1;
      }
    }
    i += n;
    value = 1 - value;
  }
  return { width, height, data };
}
