// The unclip playground: plain JavaScript over the gateway's HTTP API, no build step, no CDN.
// Every request is one the API documents; errors show the API's own message.

const KEY_STORAGE = "unclip-api-key";
// The API is where the page is mounted: this script lives at <root>/playground/playground.js.
const ROOT = new URL("..", import.meta.url);
const state = { key: sessionStorage.getItem(KEY_STORAGE) || "", info: null, busy: false, frames: [], editing: null };
const $ = (id) => document.getElementById(id);

class APIError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function authorized(headers = {}) {
  return state.key ? { ...headers, Authorization: `Bearer ${state.key}` } : headers;
}

async function errorOf(response) {
  let message = `The gateway answered HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) {
    // not JSON: keep the status line
  }
  return new APIError(response.status, message);
}

async function call(path, init = {}) {
  const response = await fetch(new URL(path, ROOT), { ...init, headers: authorized(init.headers) });
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) askForKey(error.message);
    throw error;
  }
  return response;
}

// Server-sent events of a streamed answer, as {name, data} with data parsed from JSON.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { name, data: JSON.parse(data) };
    }
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

function askForKey(message) {
  $("key-section").hidden = false;
  setStatus(message);
  $("api-key").focus();
}

const pngURL = (b64) => `data:image/png;base64,${b64}`;

function pngBlob(b64) {
  return new Blob([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], { type: "image/png" });
}

// Runs one request at a time, with its errors shown on the page.
async function busy(label, work) {
  if (state.busy) return;
  state.busy = true;
  clearError();
  setStatus(`${label}…`);
  document.querySelector("main").setAttribute("aria-busy", "true");
  for (const button of document.querySelectorAll("button")) button.disabled = true;
  try {
    await work();
    setStatus(`${label}: done.`);
  } catch (error) {
    setStatus(`${label}: failed.`);
    showError(error.message);
  } finally {
    state.busy = false;
    document.querySelector("main").removeAttribute("aria-busy");
    for (const button of document.querySelectorAll("button")) button.disabled = false;
  }
}

// The generation parameters the form sets; blank fields are left to the server's defaults.
function formParameters() {
  const params = { prompt: $("prompt").value, n: Number($("n").value || 1), size: $("size").value };
  if ($("seed").value !== "") params.seed = Number($("seed").value);
  if ($("steps").value !== "") params.decoder_steps = Number($("steps").value);
  if ($("guidance").value !== "") params.decoder_guidance_scale = Number($("guidance").value);
  return params;
}

function describe(params, seed) {
  const parts = [`seed ${seed}`, params.size];
  if (params.decoder_steps !== undefined) parts.push(`${params.decoder_steps} steps`);
  if (params.decoder_guidance_scale !== undefined) parts.push(`guidance ${params.decoder_guidance_scale}`);
  return parts.join(" · ");
}

function addResult(b64, seed, params, what) {
  const item = $("result-template").content.firstElementChild.cloneNode(true);
  const image = item.querySelector("img");
  image.src = pngURL(b64);
  image.alt = `${what}, seed ${seed}`;
  const caption = item.querySelector("figcaption");
  caption.textContent = `${what} — ${describe(params, seed)}`;
  item.dataset.b64 = b64;
  item.dataset.seed = String(seed);
  item.dataset.size = params.size;
  item.dataset.prompt = params.prompt || "";
  const pick = item.querySelector("input[type=checkbox]");
  pick.setAttribute("aria-label", `Pick ${what}, seed ${seed}, for interpolation`);
  const download = item.querySelector("[data-action=download]");
  download.href = pngURL(b64);
  download.download = `unclip-seed-${seed}.png`;
  item.querySelector("[data-action=variations]").addEventListener("click", () => makeVariations(item));
  item.querySelector("[data-action=edit]").addEventListener("click", () => startEdit(item));
  $("gallery").prepend(item);
}

// A streamed generation or edit: stage progress and previews as they come, then the images.
async function consume(response, params, what) {
  const previews = $("previews");
  previews.replaceChildren();
  $("stages").replaceChildren();
  let completed = 0;
  for await (const { name, data } of events(response)) {
    if (name === "unclip.stage") {
      const stage = document.createElement("li");
      stage.textContent = `${data.stage} finished in ${data.seconds.toFixed(2)} s`;
      $("stages").append(stage);
      setStatus(`${what}: ${data.stage} finished.`);
    } else if (name.endsWith(".partial_image")) {
      let preview = previews.querySelector(`[data-index="${data.image_index}"]`);
      if (!preview) {
        preview = document.createElement("img");
        preview.dataset.index = String(data.image_index);
        preview.width = 128;
        preview.height = 128;
        previews.append(preview);
      }
      preview.src = pngURL(data.b64_json);
      preview.alt = `Preview ${data.partial_image_index + 1} of image ${data.image_index + 1}`;
      preview.dataset.partial = String(data.partial_image_index);
      setStatus(`${what}: preview ${data.partial_image_index + 1} (${data.size}).`);
    } else if (name.endsWith(".completed")) {
      addResult(data.b64_json, data.seed, params, what);
      completed += 1;
    } else if (name === "error") {
      throw new APIError(0, data.error.message);
    }
  }
  if (completed === 0) throw new APIError(0, "The stream ended without an image");
}

async function generate(event) {
  event.preventDefault();
  const params = formParameters();
  await busy("Generating", async () => {
    const body = { ...params, stream: true, stage_events: true, partial_images: Number($("partial-images").value || 0) };
    const response = await call("v1/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    await consume(response, params, `“${params.prompt}”`);
  });
}

function form(fields, files) {
  const body = new FormData();
  for (const [name, value] of Object.entries(fields)) body.append(name, String(value));
  for (const [name, [blob, filename]] of Object.entries(files)) body.append(name, blob, filename);
  return body;
}

async function makeVariations(item) {
  const params = { n: Number($("n").value || 1), size: item.dataset.size };
  if ($("seed").value !== "") params.seed = Number($("seed").value);
  await busy("Making variations", async () => {
    const body = form({ ...params, response_format: "b64_json" }, { image: [pngBlob(item.dataset.b64), "image.png"] });
    const response = await call("v1/images/variations", { method: "POST", body });
    const answer = await response.json();
    const first = params.seed;
    answer.data.forEach((image, index) => {
      const seed = first === undefined ? "random" : first + index;
      addResult(image.b64_json, seed, params, `variation of seed ${item.dataset.seed}`);
    });
  });
}

// -- interpolation ---------------------------------------------------------------------------

function showFrame(index) {
  $("interpolation-frame").src = pngURL(state.frames[index]);
  $("interpolation-frame").alt = `Interpolation frame ${index + 1} of ${state.frames.length}`;
  $("interpolation-position").textContent = `${index + 1} / ${state.frames.length}`;
}

async function interpolate(event) {
  event.preventDefault();
  const ends = document.querySelector("input[name=ends]:checked").value;
  const frames = Number($("frames").value || 5);
  const params = { size: $("size").value, response_format: "b64_json", frames };
  if ($("seed").value !== "") params.seed = Number($("seed").value);
  await busy("Interpolating", async () => {
    let response;
    if (ends === "prompts") {
      const prompts = [$("first-prompt").value, $("second-prompt").value];
      response = await call("v1/images/interpolations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ...params, prompts }),
      });
    } else {
      const picked = [...document.querySelectorAll("#gallery .result")].filter((item) => item.querySelector("input[type=checkbox]").checked);
      if (picked.length !== 2) throw new APIError(0, `Tick exactly two results to interpolate between (${picked.length} ticked)`);
      params.size = picked[0].dataset.size;
      const files = { first_image: [pngBlob(picked[0].dataset.b64), "first.png"], second_image: [pngBlob(picked[1].dataset.b64), "second.png"] };
      response = await call("v1/images/interpolations", { method: "POST", body: form(params, files) });
    }
    state.frames = (await response.json()).data.map((image) => image.b64_json);
    const slider = $("interpolation-slider");
    slider.max = String(state.frames.length - 1);
    slider.value = "0";
    $("interpolation").hidden = false;
    showFrame(0);
  });
}

// -- edits -----------------------------------------------------------------------------------

// The mask is drawn at the image's own size: opaque = keep, transparent = redraw (OpenAI's convention).
function keepAll(mask) {
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
}

function startEdit(item) {
  const picture = new Image();
  picture.onload = () => {
    const mask = document.createElement("canvas");
    mask.width = picture.naturalWidth;
    mask.height = picture.naturalHeight;
    keepAll(mask);
    state.editing = { item, picture, mask };
    $("edit-section").hidden = false;
    $("edit-prompt").value = item.dataset.prompt || $("prompt").value;
    redrawEdit();
    $("edit-canvas").focus();
    $("edit-section").scrollIntoView();
  };
  picture.src = pngURL(item.dataset.b64);
}

function redrawEdit() {
  const { picture, mask } = state.editing;
  const canvas = $("edit-canvas");
  const context = canvas.getContext("2d");
  context.globalAlpha = 1;
  context.drawImage(picture, 0, 0, canvas.width, canvas.height);
  // Red where the mask is transparent: a red layer with the mask's opaque part cut out.
  const overlay = document.createElement("canvas");
  overlay.width = mask.width;
  overlay.height = mask.height;
  const layer = overlay.getContext("2d");
  layer.fillStyle = "#e02020";
  layer.fillRect(0, 0, overlay.width, overlay.height);
  layer.globalCompositeOperation = "destination-out";
  layer.drawImage(mask, 0, 0);
  context.globalAlpha = 0.55;
  context.drawImage(overlay, 0, 0, canvas.width, canvas.height);
  context.globalAlpha = 1;
}

function eraseMask(draw) {
  const context = state.editing.mask.getContext("2d");
  context.save();
  context.globalCompositeOperation = "destination-out";
  draw(context, state.editing.mask);
  context.restore();
  redrawEdit();
}

function paint(event) {
  if (!state.editing || !(event.buttons & 1)) return;
  const canvas = $("edit-canvas");
  const box = canvas.getBoundingClientRect();
  const scale = state.editing.mask.width / box.width;
  const x = (event.clientX - box.left) * scale;
  const y = (event.clientY - box.top) * scale;
  const radius = (Number($("brush").value) / 2) * (state.editing.mask.width / canvas.width);
  eraseMask((context) => {
    context.beginPath();
    context.arc(x, y, radius, 0, 2 * Math.PI);
    context.fill();
  });
}

async function applyEdit(event) {
  event.preventDefault();
  if (!state.editing) return;
  const { item, mask } = state.editing;
  const params = { prompt: $("edit-prompt").value, n: Number($("n").value || 1), size: item.dataset.size };
  if ($("seed").value !== "") params.seed = Number($("seed").value);
  await busy("Editing", async () => {
    const maskBlob = await new Promise((resolve) => mask.toBlob(resolve, "image/png"));
    const fields = { ...params, stream: true, stage_events: true, partial_images: Number($("partial-images").value || 0) };
    const files = { image: [pngBlob(item.dataset.b64), "image.png"], mask: [maskBlob, "mask.png"] };
    const response = await call("v1/images/edits", { method: "POST", body: form(fields, files) });
    await consume(response, params, `edit of seed ${item.dataset.seed}: “${params.prompt}”`);
  });
}

// -- start -----------------------------------------------------------------------------------

async function loadInfo() {
  let info;
  try {
    info = await (await call("v1/unclip/info")).json();
  } catch (error) {
    if (error.status !== 401) showError(error.message);
    return;
  }
  state.info = info;
  $("key-section").hidden = true;
  const size = $("size");
  size.replaceChildren(...info.sizes.map((side) => new Option(`${side}×${side}`, `${side}x${side}`)));
  size.value = `${info.sizes[info.sizes.length - 1]}x${info.sizes[info.sizes.length - 1]}`;
  if (info.default_steps.decoder) $("steps").placeholder = `default ${info.default_steps.decoder}`;
  $("guidance").placeholder = "model default";
  $("frames").max = String(info.max_frames);
  $("partial-images").max = String(info.max_partial_images);
  $("models").textContent = Object.entries(info.models)
    .map(([stage, version]) => `${stage} ${version}`)
    .join(" · ");
  setStatus("Ready.");
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORAGE, state.key);
    clearError();
    loadInfo();
  });
  $("generate-form").addEventListener("submit", generate);
  $("interpolate-form").addEventListener("submit", interpolate);
  $("interpolation-slider").addEventListener("input", (event) => showFrame(Number(event.target.value)));
  $("edit-form").addEventListener("submit", applyEdit);
  $("cancel-edit").addEventListener("click", () => {
    state.editing = null;
    $("edit-section").hidden = true;
  });
  const canvas = $("edit-canvas");
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    paint(event);
  });
  canvas.addEventListener("pointermove", paint);
  $("mask-all").addEventListener("click", () => eraseMask((context, mask) => context.fillRect(0, 0, mask.width, mask.height)));
  $("mask-left").addEventListener("click", () => eraseMask((context, mask) => context.fillRect(0, 0, mask.width / 2, mask.height)));
  $("mask-clear").addEventListener("click", () => {
    keepAll(state.editing.mask);
    redrawEdit();
  });
  loadInfo();
}

start();
