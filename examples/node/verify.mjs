#!/usr/bin/env node
// Replay an EdgeDx model's self-test vectors with onnxruntime-node: a conformance check for a
// Node.js integration of the contract in docs/integration.md.
//
//   node verify.mjs path/to/model.onnx [--sidecar path/to/model.onnx.card.json] [--json]
//
// Reads <model>.card.json (the card, the artefact's sha256 and the plain self-test vectors),
// checks the sha256, decodes the crops (raw uint8, C order, crops_shape = [n, H, W, 3], RGB),
// resizes them to the card's input_size only when H×W differs (see resize() below), builds the
// model input the card asks for (float32 NCHW normalised here, or uint8 NHWC for models with the
// preprocessing embedded), runs the model, applies the card's activation and compares with the
// reference probabilities (the fp32 PyTorch model's). Vectors in format 2 (int8 files) also carry
// `exact`, the probabilities of the file's own int8 arithmetic: top-1 and decision agreement are
// then counted against it, and the mean |Δp| from it must stay within
// tolerances.max_mean_exact_delta (docs/integration.md §9). Exit 0: within the tolerances;
// 1: outside them; 2: the files could not be used.
//
// A card with test-time views (crop.tta, schema 5, docs/integration.md §6.1) is diagnosed with the mean of
// the logits over each crop and its views, before the temperature and the activation: runViews() below does
// it. The self-test vectors judge the engine itself (one call per crop, no views), so the check above runs
// without them; the vectors' probabilities with the views averaged in are reported as tta_probabilities.

import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import process from "node:process";

const require = createRequire(import.meta.url);
const READABLE_FORMATS = [1, 2]; // 1: reference only (fp32, fp16); 2: with the exact int8 arithmetic (int8 files)

function usage(message) {
  if (message) console.error(`error: ${message}`);
  console.error("usage: node verify.mjs MODEL.onnx [--sidecar MODEL.onnx.card.json] [--json]");
  process.exit(2);
}

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

// ---------------------------------------------------------------------------------------------
// Resizing a crop to the model input (docs/integration.md §5.1). The vectors are cut at the
// crop policy's tile_size, which is usually the input_size: then nothing is resized. When the
// tile is smaller, EdgeDx calls OpenCV's cv2.resize with the card's interpolation ("area" turns
// into "linear" whenever a side grows, and a tile is never larger than the input). This is a
// plain-float re-implementation of OpenCV's nearest, bilinear and bicubic (A = -0.75) rules with
// half-pixel centres and replicated borders; OpenCV itself uses fixed-point weights for uint8, so
// a pixel may differ by one grey level. Bit-exact pixels need OpenCV (e.g. opencv.js).
// ---------------------------------------------------------------------------------------------
function resize(src, h, w, oh, ow, interpolation) {
  if (h === oh && w === ow) return src;
  let mode = interpolation;
  if (mode === "area") {
    if (oh < h && ow < w) throw new Error("shrinking with INTER_AREA is not implemented here (EdgeDx never shrinks a crop: tile_size <= input_size)");
    mode = "linear";
  }
  const out = new Uint8Array(oh * ow * 3);
  const sy = h / oh;
  const sx = w / ow;
  const clamp = (v, n) => (v < 0 ? 0 : v > n - 1 ? n - 1 : v);
  const px = (y, x, c) => src[(clamp(y, h) * w + clamp(x, w)) * 3 + c];
  const sat = (v) => (v <= 0 ? 0 : v >= 255 ? 255 : Math.round(v));
  const A = -0.75;
  const cubic = (t) => {
    const w0 = ((A * (t + 1) - 5 * A) * (t + 1) + 8 * A) * (t + 1) - 4 * A;
    const w1 = ((A + 2) * t - (A + 3)) * t * t + 1;
    const w2 = ((A + 2) * (1 - t) - (A + 3)) * (1 - t) * (1 - t) + 1;
    return [w0, w1, w2, 1 - w0 - w1 - w2];
  };
  for (let y = 0; y < oh; y++) {
    for (let x = 0; x < ow; x++) {
      for (let c = 0; c < 3; c++) {
        let v;
        if (mode === "nearest") {
          // OpenCV INTER_NEAREST: floor(dst * src/dst), no half-pixel shift
          v = px(Math.min(Math.floor(y * sy), h - 1), Math.min(Math.floor(x * sx), w - 1), c);
        } else if (mode === "linear") {
          let fy = (y + 0.5) * sy - 0.5;
          let fx = (x + 0.5) * sx - 0.5;
          let y0 = Math.floor(fy);
          let x0 = Math.floor(fx);
          fy -= y0;
          fx -= x0;
          if (y0 < 0) { y0 = 0; fy = 0; }
          if (x0 < 0) { x0 = 0; fx = 0; }
          if (y0 >= h - 1) { y0 = h - 1; fy = 0; }
          if (x0 >= w - 1) { x0 = w - 1; fx = 0; }
          const top = px(y0, x0, c) * (1 - fx) + px(y0, x0 + 1, c) * fx;
          const bottom = px(y0 + 1, x0, c) * (1 - fx) + px(y0 + 1, x0 + 1, c) * fx;
          v = sat(top * (1 - fy) + bottom * fy);
        } else if (mode === "cubic") {
          const fy = (y + 0.5) * sy - 0.5;
          const fx = (x + 0.5) * sx - 0.5;
          const y0 = Math.floor(fy);
          const x0 = Math.floor(fx);
          const wy = cubic(fy - y0);
          const wx = cubic(fx - x0);
          let sum = 0;
          for (let i = 0; i < 4; i++) {
            let row = 0;
            for (let j = 0; j < 4; j++) row += px(y0 - 1 + i, x0 - 1 + j, c) * wx[j];
            sum += row * wy[i];
          }
          v = sat(sum);
        } else {
          throw new Error(`unknown interpolation ${interpolation}`);
        }
        out[(y * ow + x) * 3 + c] = v;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Model input (docs/integration.md §5.2-5.4)
// ---------------------------------------------------------------------------------------------
const f32 = Math.fround;

function normalise(crop, h, w, card) {
  // crop: h*w*3 uint8 RGB at input size → Float32Array of 3*h*w, channel-major (one CHW image)
  const order = card.colour_order === "BGR" ? [2, 1, 0] : [0, 1, 2];
  const norm = card.normalization;
  const out = new Float32Array(3 * h * w);
  const n = h * w;
  const scale = f32(norm.pixel_scale);
  for (let c = 0; c < 3; c++) {
    const src = order[c];
    if (norm.kind === "mean_std") {
      const mean = f32(norm.mean.length === 1 ? norm.mean[0] : norm.mean[c]);
      const std = f32(norm.std.length === 1 ? norm.std[0] : norm.std[c]);
      const gain = f32(scale / std);
      const shift = f32(-mean / std);
      for (let i = 0; i < n; i++) out[c * n + i] = f32(f32(crop[i * 3 + src] * gain) + shift);
    } else {
      // per_image: per crop and channel, mean and population std in float64, std floored at 1/sqrt(h*w)
      let sum = 0;
      for (let i = 0; i < n; i++) sum += f32(crop[i * 3 + src] * scale);
      const mean = sum / n;
      let sq = 0;
      for (let i = 0; i < n; i++) {
        const d = f32(crop[i * 3 + src] * scale) - mean;
        sq += d * d;
      }
      const std = Math.max(Math.sqrt(sq / n), 1 / Math.sqrt(n));
      for (let i = 0; i < n; i++) out[c * n + i] = (f32(crop[i * 3 + src] * scale) - mean) / std;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Test-time views (docs/integration.md §6.1): each view is a copy of the model-input batch with its
// (height, width) axes flipped or turned, as numpy's np.flip / np.rot90(k, axes=(H, W)) make them.
// ---------------------------------------------------------------------------------------------
const TTA_VIEWS = ["hflip", "vflip", "rot180", "rot90", "rot270"];

function viewOf(data, dims, layout, name) {
  // data: the batch as fed (Float32Array NCHW or Uint8Array NHWC); returns [data, dims] of the view
  const nchw = layout === "float32_nchw";
  const [n, a, b, c] = dims;
  const [channels, h, w] = nchw ? [a, b, c] : [c, a, b];
  const quarter = name === "rot90" || name === "rot270";
  const [oh, ow] = quarter ? [w, h] : [h, w];
  // source pixel (y, x) of output pixel (i, j)
  const source = {
    hflip: (i, j) => [i, w - 1 - j],
    vflip: (i, j) => [h - 1 - i, j],
    rot180: (i, j) => [h - 1 - i, w - 1 - j],
    rot90: (i, j) => [j, w - 1 - i],
    rot270: (i, j) => [h - 1 - j, i],
  }[name];
  if (!source) throw new Error(`unknown test-time view ${name}; use any of ${TTA_VIEWS.join(", ")}`);
  const out = new data.constructor(data.length);
  const plane = h * w;
  for (let k = 0; k < n; k++) {
    const base = k * channels * plane;
    for (let i = 0; i < oh; i++) {
      for (let j = 0; j < ow; j++) {
        const [y, x] = source(i, j);
        for (let ch = 0; ch < channels; ch++) {
          if (nchw) out[base + ch * plane + i * ow + j] = data[base + ch * plane + y * w + x];
          else out[base + (i * ow + j) * channels + ch] = data[base + (y * w + x) * channels + ch];
        }
      }
    }
  }
  return [out, nchw ? [n, channels, oh, ow] : [n, oh, ow, channels]];
}

async function runViews(ort, session, data, dims, layout, views) {
  // the mean of the logits over the batch itself and each view (float64), one engine call each at one batch size
  const type = layout === "uint8_nhwc" ? "uint8" : "float32";
  let sum = null;
  let width = 1;
  for (const name of [null, ...views]) {
    const [x, shape] = name === null ? [data, dims] : viewOf(data, dims, layout, name);
    const result = await session.run({ [session.inputNames[0]]: new ort.Tensor(type, x, shape) });
    const logits = result[session.outputNames[0]];
    width = logits.dims.length === 1 ? 1 : logits.dims[1];
    if (sum === null) sum = new Float64Array(logits.data.length);
    for (let i = 0; i < sum.length; i++) sum[i] += Number(logits.data[i]);
  }
  return { logits: sum.map((v) => v / (1 + views.length)), width };
}

// ---------------------------------------------------------------------------------------------
// Outputs and decisions (docs/integration.md §6)
// ---------------------------------------------------------------------------------------------
function activate(logits, card) {
  // schema 4: the card's temperature divides the logits first (one value, or one per label for multilabel)
  const names = card.class_names;
  const temps = card.calibration?.method === "temperature" ? card.calibration.temperature : [];
  const row = temps.length ? logits.map((z, i) => z / temps[temps.length === 1 ? 0 : i]) : logits;
  if (card.output_activation === "sigmoid") {
    const p = row.map((z) => 0.5 * (1 + Math.tanh(0.5 * z)));
    if (card.task === "binary" && p.length === 1) {
      const pos = names.indexOf(card.positive_class);
      const out = [0, 0];
      out[pos] = p[0];
      out[1 - pos] = 1 - p[0];
      return out;
    }
    return p;
  }
  const m = Math.max(...row);
  const e = row.map((z) => Math.exp(z - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

function argmax(p) {
  let best = 0;
  for (let i = 1; i < p.length; i++) if (p[i] > p[best]) best = i;
  return best;
}

function decide(p, card) {
  const threshold = card.threshold === null ? 0.5 : card.threshold;
  const names = card.class_names;
  if (card.task === "binary") {
    const pos = names.indexOf(card.positive_class);
    return p[pos] >= threshold ? names[pos] : names[1 - pos];
  }
  if (card.task === "multilabel") return names.filter((_, i) => p[i] >= threshold).join("|");
  return names[argmax(p)];
}

// ---------------------------------------------------------------------------------------------
async function main() {
  const args = process.argv.slice(2);
  const json = args.includes("--json");
  let sidecarPath = null;
  const positional = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--json") continue;
    if (args[i] === "--sidecar") sidecarPath = args[++i];
    else if (args[i] === "-h" || args[i] === "--help") usage();
    else positional.push(args[i]);
  }
  if (positional.length !== 1) usage("give one model file");
  const modelPath = positional[0];
  sidecarPath = sidecarPath ?? `${modelPath}.card.json`;
  if (!existsSync(modelPath)) fail(`model file not found: ${modelPath}`);
  if (!existsSync(sidecarPath)) fail(`card sidecar not found: ${sidecarPath} (export the model with edgedx export)`);

  let doc;
  try {
    doc = JSON.parse(readFileSync(sidecarPath, "utf8"));
  } catch (err) {
    fail(`${sidecarPath} is not JSON: ${err.message}`);
  }
  const { card, artefact, selftest } = doc;
  if (!card || !artefact) fail(`${sidecarPath} has no card or artefact block`);
  const sha256 = createHash("sha256").update(readFileSync(modelPath)).digest("hex");
  if (sha256 !== artefact.sha256) fail(`${sidecarPath} belongs to another file (sha256 ${artefact.sha256.slice(0, 12)}…, the model is ${sha256.slice(0, 12)}…)`);
  if (!selftest) fail(`${sidecarPath} carries no self-test vectors; re-export the model with edgedx export`);
  if (!READABLE_FORMATS.includes(selftest.format)) {
    fail(`self-test vectors in format ${selftest.format}; this script reads formats ${READABLE_FORMATS.join(" and ")}: upgrade it (take verify.mjs from the EdgeDx version that exported the model)`);
  }

  const [n, th, tw, channels] = selftest.crops_shape;
  if (channels !== 3) fail(`crops_shape ${JSON.stringify(selftest.crops_shape)}: expected (n, H, W, 3)`);
  const raw = Buffer.from(selftest.crops_base64, "base64");
  if (raw.length !== n * th * tw * 3) fail(`crops_base64 holds ${raw.length} bytes, crops_shape needs ${n * th * tw * 3}`);
  const [ih, iw] = card.input_size;
  const resized = th !== ih || tw !== iw;
  const crops = [];
  for (let k = 0; k < n; k++) {
    const crop = new Uint8Array(raw.buffer, raw.byteOffset + k * th * tw * 3, th * tw * 3);
    crops.push(resize(crop, th, tw, ih, iw, card.interpolation));
  }

  const ort = require("onnxruntime-node");
  const session = await ort.InferenceSession.create(modelPath, { executionProviders: ["cpu"] });
  const views = card.crop?.tta ?? [];
  const unknownView = views.find((v) => !TTA_VIEWS.includes(v));
  if (unknownView !== undefined) fail(`card crop.tta names an unknown view ${unknownView}; this script knows ${TTA_VIEWS.join(", ")}: upgrade it`);
  const layout = card.input_format;
  // A graph with a fixed batch (.ort files, --fixed-batch N) takes exactly that many crops: pad the last chunk.
  const dim0 = session.inputMetadata?.[0]?.shape?.[0];
  const fixed = Number.isInteger(dim0) && dim0 > 0 ? dim0 : null;
  const batch = fixed ?? 8;
  const probabilities = []; // the engine's own (the self-test)
  const ttaProbabilities = []; // with the card's test-time views averaged in, as diagnose computes them
  for (let start = 0; start < n; start += batch) {
    const chunk = crops.slice(start, start + batch);
    const used = chunk.length;
    while (fixed !== null && chunk.length < fixed) chunk.push(chunk[chunk.length - 1]);
    let data;
    let dims;
    if (layout === "uint8_nhwc") {
      data = new Uint8Array(chunk.length * ih * iw * 3);
      chunk.forEach((c, i) => data.set(c, i * ih * iw * 3));
      dims = [chunk.length, ih, iw, 3];
    } else {
      data = new Float32Array(chunk.length * 3 * ih * iw);
      chunk.forEach((c, i) => data.set(normalise(c, ih, iw, card), i * 3 * ih * iw));
      dims = [chunk.length, 3, ih, iw];
    }
    for (const [selected, into] of views.length ? [[[], probabilities], [views, ttaProbabilities]] : [[[], probabilities]]) {
      const { logits, width } = await runViews(ort, session, data, dims, layout, selected);
      for (let i = 0; i < used; i++) into.push(activate(Array.from(logits.slice(i * width, (i + 1) * width)), card));
    }
  }

  const reference = selftest.reference;
  // int8 (format 2): agreement is counted against the file's exact int8 arithmetic, which every conforming int8
  // engine computes; its quality against fp32 was judged at export. Otherwise against the fp32 reference.
  const exact = selftest.exact ?? null;
  if (exact !== null && (!Array.isArray(exact) || exact.length !== n)) fail(`selftest.exact has ${exact?.length} rows, crops_shape says ${n}`);
  const agreeWith = exact ?? reference;
  let maxDelta = 0;
  let top1 = 0;
  let decisions = 0;
  let exactSum = 0;
  for (let k = 0; k < n; k++) {
    const got = probabilities[k];
    const ref = reference[k];
    const want = agreeWith[k];
    if (got.length !== ref.length) fail(`the model gives ${got.length} probabilities, the reference ${ref.length}`);
    if (want.length !== ref.length) fail(`selftest.exact rows have ${want.length} probabilities, the reference ${ref.length}`);
    for (let c = 0; c < ref.length; c++) {
      maxDelta = Math.max(maxDelta, Math.abs(got[c] - ref[c]));
      if (exact !== null) exactSum += Math.abs(got[c] - want[c]);
    }
    if (argmax(got) === argmax(want)) top1 += 1;
    if (decide(got, card) === decide(want, card)) decisions += 1;
  }
  top1 = n ? top1 / n : 1;
  decisions = n ? decisions / n : 1;
  const exactMean = exact !== null && n ? exactSum / (n * reference[0].length) : null;
  const tol = selftest.tolerances;
  const exactLimit = tol.max_mean_exact_delta ?? null;
  const failures = [];
  if (!(maxDelta <= tol.max_prob_delta)) failures.push(`max |Δp| from the fp32 reference ${maxDelta.toExponential(2)} > ${tol.max_prob_delta}`);
  if (!(Math.min(top1, decisions) >= tol.min_agreement)) {
    failures.push(`agreement ${Math.min(top1, decisions).toFixed(3)} < ${tol.min_agreement} (against the ${exact !== null ? "file's exact int8 arithmetic" : "fp32 reference"})`);
  }
  if (exactMean !== null && exactLimit !== null && !(exactMean <= exactLimit)) {
    failures.push(
      `mean |Δp| from the file's exact int8 arithmetic ${exactMean.toFixed(3)} > ${exactLimit}: this engine's int8 kernels ` +
        "do not compute what the file means (they round or saturate differently)",
    );
  }
  const passed = failures.length === 0;
  const about = selftest.about || artefact.int8_flavour?.about || null;
  const report = {
    model: modelPath, n, format: selftest.format, precision: selftest.precision, input_format: card.input_format,
    crops_shape: selftest.crops_shape, input_size: card.input_size, resized,
    max_prob_delta: maxDelta, top1_agreement: top1, decision_agreement: decisions,
    agreement_against: exact !== null ? "exact" : "reference", exact_mean_delta: exactMean, about,
    tolerances: tol, passed, failures, onnxruntime_node: ort.env.versions?.node ?? null,
    tta_views: views, tta_probabilities: views.length ? ttaProbabilities : null,
  };
  console.log(
    `self-test ${passed ? "passed" : "FAILED"} on ${n} vectors (${selftest.precision}, onnxruntime-node ${report.onnxruntime_node}): ` +
      `max |Δp| ${maxDelta.toExponential(2)} (≤ ${tol.max_prob_delta}), top-1 agreement ${top1.toFixed(3)} and ` +
      `decision agreement ${decisions.toFixed(3)} (≥ ${tol.min_agreement})` +
      (exactMean !== null
        ? `; mean |Δp| from the file's exact int8 arithmetic ${exactMean.toFixed(3)}` +
          ` (${exactLimit !== null ? `≤ ${exactLimit}; ` : ""}agreement counted against that arithmetic)`
        : "") +
      (resized ? `; crops resized ${th}×${tw} → ${ih}×${iw} (${card.interpolation})` : "; crops already at the input size"),
  );
  if (views.length) {
    console.log(
      `test-time views (crop.tta): ${views.join(", ")}; diagnose averages each crop's logits with these views' before the ` +
        "temperature and the activation (the self-test judges the engine alone, without them)",
    );
  }
  if (!passed) {
    console.log(
      `refused: ${failures.join("; ")}.` + (about ? ` This file: ${about}.` : "") +
        (exact !== null ? " Load another int8 flavour of this export whose self-test passes here, or the fp32 model." : ""),
    );
  }
  if (json) console.log(JSON.stringify(report));
  process.exit(passed ? 0 : 1);
}

main().catch((err) => fail(err?.stack ?? String(err)));
