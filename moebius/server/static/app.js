// moebius web page: paint a mask over a photo, send both to POST /v1/inpaint, show the result.
// Plain JS, no build step, no network besides this server. The mask is a canvas at the image's
// full resolution (painted = fill, transparent = keep) rebuilt from a list of operations, so undo
// and redo are exact; the canvases are only scaled for display. Its alpha is the mask.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("view"), maskCanvas = $("mask"), cursor = $("cursor");
const viewCtx = view.getContext("2d"), maskCtx = maskCanvas.getContext("2d");
const MASK_COLOUR = "#ff3355";  // display only: the mask sent is the canvas alpha, white on black

const state = {
  file: null,        // Blob of the input exactly as sent (original bytes, never re-encoded)
  name: "image",     // file stem for the download name
  input: null,       // ImageBitmap of the input
  result: null,      // ImageBitmap of the last result
  resultUrl: null,   // object URL of the result bytes (download, continue editing)
  resultBlob: null,
  ops: [],           // mask history: {type: "stroke", erase, size, points} | {type: "mask", canvas} | {type: "clear"}
  undone: [],        // redo stack
  stroke: null,      // the stroke being drawn
  erase: false,
  showOriginal: false,
  running: false,
};

// ------------------------------------------------------------------ server calls
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.error}: ${body.detail}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

async function loadInfo() {
  // Settings start at the server's defaults; retry while the model loads.
  for (let attempt = 0; attempt < 600; attempt++) {
    try {
      const response = await fetch("/v1/info", { headers: authHeaders() });
      if (response.status === 401) {
        setStatus("this server needs an API key: enter it under Settings", true);
        $("settings").open = true;
        return;
      }
      const info = await response.json();
      const d = info.defaults;
      $("steps").value ||= d.steps;
      $("guidance").value ||= d.guidance_scale;
      $("seed").value ||= d.seed;
      $("dilation").value ||= d.mask_dilation;
      $("strategy").value = d.strategy;
      $("task").value = d.task;
      if (info.device) {
        setStatus(`ready: ${info.model} ${info.variant || ""} on ${info.device} (${info.dtype}), `
          + `native ${info.native_size} px`);
        return;
      }
      setStatus("loading the model...");
    } catch (err) {
      setStatus(`cannot reach the server (${err})`, true);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ------------------------------------------------------------------ images in and out
async function openImage(blob, name) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
  } catch (err) {
    setStatus(`${name}: not an image this browser can read`, true);
    return;
  }
  state.file = blob;
  state.name = (name || "image").replace(/\.[^.]*$/, "");
  state.input = bitmap;
  state.ops = [];
  state.undone = [];
  setResult(null, null);
  for (const c of [view, maskCanvas]) {
    c.width = bitmap.width;
    c.height = bitmap.height;
  }
  $("canvases").hidden = false;
  $("hint").hidden = true;
  fitView();
  renderMask();
  render();
  setStatus(`${name}: ${bitmap.width}x${bitmap.height}`);
}

async function loadMaskFile(blob) {
  if (!state.input) return;
  const bitmap = await createImageBitmap(blob);
  if (bitmap.width !== state.input.width || bitmap.height !== state.input.height) {
    setStatus(`mask is ${bitmap.width}x${bitmap.height}, image is `
      + `${state.input.width}x${state.input.height}: sizes must match`, true);
    return;
  }
  // White (>= 128 grey) = fill; stored as opaque-on-transparent like painted strokes.
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const pixels = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const grey = 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2];
    const fill = grey >= 127.5 && d[i + 3] >= 128;
    [d[i], d[i + 1], d[i + 2]] = [255, 51, 85];  // MASK_COLOUR
    d[i + 3] = fill ? 255 : 0;
  }
  ctx.putImageData(pixels, 0, 0);
  pushOp({ type: "mask", canvas });
}

function setResult(bitmap, blob) {
  if (state.resultUrl) URL.revokeObjectURL(state.resultUrl);
  state.result = bitmap;
  state.resultBlob = blob;
  state.resultUrl = blob ? URL.createObjectURL(blob) : null;
  const link = $("download");
  link.href = state.resultUrl || "#";
  link.download = `${state.name}_inpainted.png`;
  link.setAttribute("aria-disabled", String(!blob));
  $("continue").disabled = !blob;
  $("compare").disabled = !blob;
  $("compare").value = 0;
}

// ------------------------------------------------------------------ drawing
function fitView() {
  // Display size only: the canvases keep the image's resolution.
  if (!state.input) return;
  const stage = $("stage").getBoundingClientRect();
  const scale = Math.min((stage.width - 16) / view.width, (stage.height - 16) / view.height);
  const box = $("canvases").style;
  box.width = view.style.width = `${Math.floor(view.width * scale)}px`;
  box.height = view.style.height = `${Math.floor(view.height * scale)}px`;
}
window.addEventListener("resize", fitView);

function render() {
  if (!state.input) return;
  const shown = state.result && !state.showOriginal ? state.result : state.input;
  viewCtx.drawImage(shown, 0, 0);
  const split = Number($("compare").value) / 100;  // left part shows the original
  if (state.result && !state.showOriginal && split > 0) {
    const w = Math.round(view.width * split);
    viewCtx.drawImage(state.input, 0, 0, w, view.height, 0, 0, w, view.height);
    viewCtx.fillStyle = "#fff";
    viewCtx.fillRect(w - 1, 0, 2, view.height);
  }
  maskCanvas.classList.toggle("hidden-mask", Boolean(state.result) || state.showOriginal);
}

function drawStroke(ctx, op, from = 0) {
  ctx.save();
  ctx.globalCompositeOperation = op.erase ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = MASK_COLOUR;
  ctx.lineWidth = op.size;
  ctx.lineCap = ctx.lineJoin = "round";
  const p = op.points;
  if (p.length === 1) {
    ctx.beginPath();
    ctx.arc(p[0][0], p[0][1], op.size / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.beginPath();
    ctx.moveTo(...p[Math.max(from - 1, 0)]);
    for (let i = Math.max(from, 1); i < p.length; i++) ctx.lineTo(...p[i]);
    ctx.stroke();
  }
  ctx.restore();
}

function renderMask() {
  maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  for (const op of state.ops) {
    if (op.type === "stroke") drawStroke(maskCtx, op);
    else if (op.type === "clear") maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
    else if (op.type === "mask") {
      maskCtx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
      maskCtx.drawImage(op.canvas, 0, 0);
    }
  }
  updateButtons();
}

function pushOp(op) {
  state.ops.push(op);
  state.undone = [];
  if (state.result) setResult(null, null);  // editing the mask starts a new run
  renderMask();
  render();
}

function undo() {
  if (!state.ops.length) return;
  state.undone.push(state.ops.pop());
  renderMask();
  render();
}

function redo() {
  if (!state.undone.length) return;
  state.ops.push(state.undone.pop());
  renderMask();
  render();
}

function updateButtons() {
  $("undo").disabled = !state.ops.length;
  $("redo").disabled = !state.undone.length;
  $("clear").disabled = !state.ops.length;
  $("run").disabled = !state.input || state.running;
}

// Pointer position in image pixels (the canvas is scaled to the window).
function imagePoint(event) {
  const rect = maskCanvas.getBoundingClientRect();
  return [
    (event.clientX - rect.left) * (maskCanvas.width / rect.width),
    (event.clientY - rect.top) * (maskCanvas.height / rect.height),
  ];
}

function brushSize() {
  // The slider is in screen pixels; the stroke is stored in image pixels.
  const rect = maskCanvas.getBoundingClientRect();
  return Number($("size").value) * (maskCanvas.width / rect.width);
}

function moveCursor(event) {
  const box = $("canvases").getBoundingClientRect();
  const size = Number($("size").value);
  Object.assign(cursor.style, {
    display: "block", width: `${size}px`, height: `${size}px`,
    left: `${event.clientX - box.left}px`, top: `${event.clientY - box.top}px`,
  });
}

maskCanvas.addEventListener("pointerdown", (event) => {
  if (!state.input || event.button > 0) return;
  maskCanvas.setPointerCapture(event.pointerId);
  if (state.result) setResult(null, null);
  state.stroke = { type: "stroke", erase: state.erase, size: brushSize(), points: [imagePoint(event)] };
  drawStroke(maskCtx, state.stroke);
  render();
});
maskCanvas.addEventListener("pointermove", (event) => {
  moveCursor(event);
  if (!state.stroke) return;
  // Coalesced events keep fast pen and touch strokes smooth.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  const from = state.stroke.points.length;
  for (const e of events.length ? events : [event]) state.stroke.points.push(imagePoint(e));
  drawStroke(maskCtx, state.stroke, from);
});
function endStroke() {
  if (!state.stroke) return;
  const op = state.stroke;
  state.stroke = null;
  pushOp(op);
}
maskCanvas.addEventListener("pointerup", endStroke);
maskCanvas.addEventListener("pointercancel", endStroke);
maskCanvas.addEventListener("pointerleave", () => { cursor.style.display = "none"; });

// ------------------------------------------------------------------ run
function maskBlob() {
  // White (255) = fill on black, at the image's resolution, as the API expects.
  const out = new OffscreenCanvas(maskCanvas.width, maskCanvas.height);
  const ctx = out.getContext("2d");
  ctx.drawImage(maskCanvas, 0, 0);
  ctx.globalCompositeOperation = "source-in";  // white where painted, keeping the alpha
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.globalCompositeOperation = "destination-over";  // black behind
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  return out.convertToBlob({ type: "image/png" });
}

function parseEvents(buffer, onEvent) {
  // Server-sent events: blocks separated by a blank line, "event:" and "data:" lines.
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const block = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    let name = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    onEvent(name, data ? JSON.parse(data) : null);
  }
  return buffer;
}

async function run() {
  if (!state.input || state.running) return;
  state.running = true;
  updateButtons();
  $("progress").removeAttribute("value");  // indeterminate until the first step
  setStatus("sending...");
  const form = new FormData();
  form.append("image", state.file, `${state.name}.png`);
  form.append("mask", await maskBlob(), "mask.png");
  const fields = { steps: "steps", guidance_scale: "guidance", seed: "seed",
    strategy: "strategy", mask_dilation: "dilation", task: "task" };
  for (const [key, id] of Object.entries(fields)) {
    if ($(id).value !== "") form.append(key, $(id).value);
  }
  try {
    const response = await fetch("/v1/inpaint", {
      method: "POST", body: form, headers: { Accept: "text/event-stream", ...authHeaders() },
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", done = false, outcome = null;
    while (!done) {
      const chunk = await reader.read();
      done = chunk.done;
      buffer = parseEvents(buffer + (chunk.value || ""), (name, data) => {
        if (name === "queued" && data.position > 0) setStatus(`queued (position ${data.position})`);
        if (name === "progress") {
          $("progress").value = data.step / data.steps;
          setStatus(`step ${data.step}/${data.steps}` + (data.run > 1 ? ` (window batch ${data.run})` : ""));
        }
        if (name === "result" || name === "error") outcome = { name, data };
      });
    }
    if (!outcome) throw new Error("the server closed the stream without a result");
    if (outcome.name === "error") {
      throw new Error(`${outcome.data.status} ${outcome.data.error}: ${outcome.data.detail}`);
    }
    const bytes = Uint8Array.from(atob(outcome.data.image), (c) => c.charCodeAt(0));
    const blob = new Blob([bytes], { type: outcome.data.media_type });
    setResult(await createImageBitmap(blob), blob);
    $("progress").value = 1;
    setStatus(`done (seed ${outcome.data.seed})`);
  } catch (err) {
    $("progress").value = 0;
    setStatus(String(err.message || err), true);
  } finally {
    state.running = false;
    updateButtons();
    render();
  }
}

async function continueEditing() {
  if (!state.resultBlob) return;
  await openImage(state.resultBlob, `${state.name}_inpainted.png`);
}

// ------------------------------------------------------------------ controls and keys
function setTool(erase) {
  state.erase = erase;
  $("brush").classList.toggle("active", !erase);
  $("eraser").classList.toggle("active", erase);
}

function setSize(value) {
  const slider = $("size");
  slider.value = Math.min(Number(slider.max), Math.max(Number(slider.min), value));
  $("size-value").textContent = slider.value;
}

$("open").addEventListener("change", (e) => e.target.files[0] && openImage(e.target.files[0], e.target.files[0].name));
$("open-mask").addEventListener("change", (e) => e.target.files[0] && loadMaskFile(e.target.files[0]));
$("brush").addEventListener("click", () => setTool(false));
$("eraser").addEventListener("click", () => setTool(true));
$("size").addEventListener("input", (e) => setSize(e.target.value));
$("undo").addEventListener("click", undo);
$("redo").addEventListener("click", redo);
$("clear").addEventListener("click", () => pushOp({ type: "clear" }));
$("run").addEventListener("click", run);
$("continue").addEventListener("click", continueEditing);
$("compare").addEventListener("input", render);
$("api-key").value = localStorage.getItem("moebius-api-key") || "";
$("api-key").addEventListener("change", (e) => {
  localStorage.setItem("moebius-api-key", e.target.value.trim());
  loadInfo();
});

document.addEventListener("keydown", (event) => {
  if (event.target.matches("input[type=number], input[type=password], select")) return;
  const ctrl = event.ctrlKey || event.metaKey;
  const key = event.key.toLowerCase();
  if (ctrl && key === "z") {
    event.preventDefault();
    event.shiftKey ? redo() : undo();
  } else if (ctrl && key === "y") {
    event.preventDefault();
    redo();
  } else if (event.key === "[") setSize(Number($("size").value) - 5);
  else if (event.key === "]") setSize(Number($("size").value) + 5);
  else if (key === "b" && !ctrl) setTool(false);
  else if (key === "e" && !ctrl) setTool(true);
  else if (key === "r" && event.shiftKey && !ctrl) run();
  else if (event.key === "Tab" && state.input) {
    event.preventDefault();  // hold Tab to see the original
    state.showOriginal = true;
    render();
  }
});
document.addEventListener("keyup", (event) => {
  if (event.key === "Tab" && state.showOriginal) {
    state.showOriginal = false;
    render();
  }
});

// Drop or paste an image anywhere.
const stage = $("stage");
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragover"); });
stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("dragover");
  const file = e.dataTransfer.files[0];
  if (file) openImage(file, file.name);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) openImage(item.getAsFile(), "pasted.png");
});

updateButtons();
loadInfo();
