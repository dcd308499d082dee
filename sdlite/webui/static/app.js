// The sdlite page: a thin client of the A1111-compatible API under /sdapi/v1/ (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const PNG = "data:image/png;base64,";

const ui = {
  mode: "txt2img",       // "txt2img" | "img2img" | "pnginfo"
  results: [],           // [{b64, infotext, seed, subseed}]
  selected: -1,
  initImage: null,       // data URL of the img2img init image
  parsed: null,          // parameters of the last PNG Info read
  busy: false,
};

// -- the API ------------------------------------------------------------------------------

async function api(path, body) {
  const opts = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch("/sdapi/v1/" + path, opts);
  const data = await r.json().catch(() => null);
  if (!r.ok) throw new Error(errorMessage(r.status, data));
  return data;
}

function errorMessage(status, data) {
  if (data && Array.isArray(data.detail)) {  // 422: pydantic names the field
    return data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
  }
  return `${status}: ${(data && (data.errors || data.detail)) || "request failed"}`;
}

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

// -- setup --------------------------------------------------------------------------------

async function loadLists() {
  const [samplers, schedulers] = await Promise.all([api("samplers"), api("schedulers")]);
  ui.samplers = samplers;
  ui.schedulers = schedulers;
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  $("sampler").value = "Euler a";
  $("scheduler").replaceChildren(...schedulers.map((s) => new Option(s.label, s.name)));
  $("scheduler").value = "automatic";
  const options = await loadModels();
  for (const key of Object.keys(SETTINGS)) setSetting(key, options[key]);  // the server's, once at start
}

async function loadModels() {
  const [models, options] = await Promise.all([api("sd-models"), api("options")]);
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.title, m.title)));
  if (options.sd_model_checkpoint) select.value = options.sd_model_checkpoint;
  $("model-status").textContent = models.length ? "" : "no checkpoint found";
  return options;
}

async function switchModel() {
  const select = $("model");
  select.disabled = true;
  $("model-status").textContent = "loading…";
  try {
    await api("options", {sd_model_checkpoint: select.value});
    await loadModels();
  } catch (e) {
    $("model-status").textContent = e.message;
    return;
  } finally {
    select.disabled = false;
  }
  $("model-status").textContent = "";
}

function setTab(tab) {
  ui.mode = tab;
  document.querySelectorAll(".tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === tab));
  $("generate-tab").hidden = tab === "pnginfo";
  $("pnginfo-tab").hidden = tab !== "pnginfo";
  $("img2img-panel").hidden = tab !== "img2img";
}

// -- generation ---------------------------------------------------------------------------

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

// A1111's settings the page sends with each request (override_settings; the server's own stay as they
// are), shown in "Sampler parameters" and filled from the server's options at start.
const SETTINGS = {
  CLIP_stop_at_last_layers: "number", uni_pc_order: "number", uni_pc_variant: "text", uni_pc_skip_type: "text",
  uni_pc_lower_order_final: "bool", beta_dist_alpha: "number", beta_dist_beta: "number",
  token_merging_ratio: "number", eta_noise_seed_delta: "number",
};

function settingsFromForm() {
  const out = {};
  for (const [key, kind] of Object.entries(SETTINGS)) {
    const el = $(key);
    out[key] = kind === "bool" ? el.checked : kind === "text" ? el.value : Number(el.value);
  }
  return out;
}

function setSetting(key, value) {
  if (value === undefined || value === null || !(key in SETTINGS)) return;
  if (SETTINGS[key] === "bool") $(key).checked = Boolean(value); else $(key).value = value;
}

function payload() {
  const p = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    steps: intOrNull("steps") ?? 20,
    cfg_scale: intOrNull("cfg_scale") ?? 7,  // an emptied field: A1111's default, not 0
    seed: intOrNull("seed") ?? -1,
    subseed: intOrNull("subseed") ?? -1,
    subseed_strength: Number($("subseed_strength").value) || 0,
    seed_resize_from_w: intOrNull("seed_resize_from_w") ?? 0,
    seed_resize_from_h: intOrNull("seed_resize_from_h") ?? 0,
    batch_size: intOrNull("batch_size") ?? 1,
    n_iter: intOrNull("n_iter") ?? 1,
    override_settings: settingsFromForm(),
  };
  if (intOrNull("width") !== null) p.width = intOrNull("width");
  if (intOrNull("height") !== null) p.height = intOrNull("height");
  if (ui.mode === "img2img") {
    p.init_images = ui.initImage ? [ui.initImage] : [];
    p.denoising_strength = Number($("denoising_strength").value);
    p.resize_mode = Number($("resize_mode").value);
  }
  return p;
}

async function generate() {
  if (ui.busy) return;
  if (ui.mode === "img2img" && !ui.initImage) { showError("img2img: choose an init image first"); return; }
  showError("");
  ui.busy = true;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress-text").textContent = "Waiting…";
  $("bar-fill").style.width = "0";
  const started = performance.now();
  const poll = startProgress();
  try {
    const res = await api(ui.mode, payload());
    const info = JSON.parse(res.info);
    // The variation seed to reuse: as A1111's reuse button, the image's seed when no variation strength was set.
    ui.results = res.images.map((b64, i) => ({b64, infotext: info.infotexts[i], seed: info.all_seeds[i],
                                              subseed: info.subseed_strength > 0 ? info.all_subseeds[i] : info.all_seeds[i]}));
    renderGallery();
    select(0);
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    $("progress-text").textContent = `Done: ${ui.results.length} image(s) in ${secs} s`;
    $("bar-fill").style.width = "100%";
  } catch (e) {
    showError(e.message);
    $("progress-text").textContent = "Failed";
  } finally {
    poll.stop();
    $("viewer").parentElement.classList.remove("live");
    ui.busy = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

// Poll GET /progress while a request runs: the bar, "Step i/N", the ETA and the latent preview.
function startProgress() {
  let running = true;
  const tick = async () => {
    if (!running) return;
    try {
      const p = await api("progress?skip_current_image=false");
      if (running && p.state.job_count > 0) {
        $("bar-fill").style.width = `${Math.round(p.progress * 100)}%`;
        const s = p.state;
        let text = s.sampling_steps ? `Step ${s.sampling_step}/${s.sampling_steps}` : (p.textinfo || "Starting…");
        if (s.job_count > 1) text += ` · batch ${s.job_no + 1}/${s.job_count}`;
        if (s.sampling_step > 0 && p.eta_relative > 0) text += ` · ETA ${p.eta_relative.toFixed(1)} s`;
        $("progress-text").textContent = text;
        if (p.current_image) {
          $("viewer").src = PNG + p.current_image;
          $("viewer").parentElement.classList.add("live");
        }
      }
    } catch (e) { /* keep polling; the request itself reports errors */ }
    if (running) setTimeout(tick, 250);
  };
  setTimeout(tick, 100);
  return {stop: () => { running = false; }};
}

function renderGallery() {
  $("gallery").replaceChildren(...ui.results.map((r, i) => {
    const img = new Image();
    img.src = PNG + r.b64;
    img.alt = `image ${i + 1}`;
    img.addEventListener("click", () => select(i));
    return img;
  }));
}

function select(i) {
  ui.selected = i;
  const r = ui.results[i];
  [...$("gallery").children].forEach((el, j) => el.classList.toggle("selected", j === i));
  $("viewer").src = r ? PNG + r.b64 : "";
  $("infotext").textContent = r ? r.infotext : "";
  $("send-img2img").disabled = $("send-pnginfo").disabled = !r;
}

// -- images in: init image, PNG Info --------------------------------------------------------

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function dropZone(zoneId, inputId, onImage) {
  const zone = $(zoneId);
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) onImage(await readFile(file));
  });
  $(inputId).addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) onImage(await readFile(file));
  });
}

function setInitImage(dataUrl) {
  ui.initImage = dataUrl;
  $("init-preview").src = dataUrl;
}

async function readPngInfo(dataUrl) {
  $("png-image").src = dataUrl;
  $("png-text").textContent = "reading…";
  try {
    const res = await api("png-info", {image: dataUrl});
    ui.parsed = res.info ? res.parameters : null;
    $("png-text").textContent = res.info || "(no parameters in this image)";
    $("png-params").replaceChildren(...Object.entries(res.parameters || {}).map(([k, v]) => {
      const tr = document.createElement("tr");
      tr.append(Object.assign(document.createElement("td"), {textContent: k}),
                Object.assign(document.createElement("td"), {textContent: v}));
      return tr;
    }));
  } catch (e) {
    ui.parsed = null;
    $("png-text").textContent = e.message;
  }
  $("png-send-txt2img").disabled = $("png-send-img2img").disabled = !ui.parsed;
}

// Fill the form from parsed infotext (the keys of A1111's parse_generation_parameters).
function applyParameters(p, tab) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  set("prompt", p["Prompt"]);
  set("negative_prompt", p["Negative prompt"]);
  set("steps", p["Steps"]);
  set("cfg_scale", p["CFG scale"]);
  set("seed", p["Seed"]);
  // A1111 writes the seed tools only when they are used: absent means off.
  set("subseed", p["Variation seed"] ?? -1);
  set("subseed_strength", p["Variation seed strength"] ?? 0);
  set("seed_resize_from_w", p["Seed resize from-1"] ?? 0);
  set("seed_resize_from_h", p["Seed resize from-2"] ?? 0);
  set("width", p["Size-1"]);
  set("height", p["Size-2"]);
  if (p["Denoising strength"] !== undefined) {
    set("denoising_strength", p["Denoising strength"]);
    $("denoising-out").value = p["Denoising strength"];
  }
  setSetting("CLIP_stop_at_last_layers", p["Clip skip"] ?? 1);  // A1111 writes it only when it is not 1
  setSetting("beta_dist_alpha", p["Beta schedule alpha"]);
  setSetting("beta_dist_beta", p["Beta schedule beta"]);
  setSetting("token_merging_ratio", p["Token merging ratio"] ?? 0);  // written only when merging was on
  setSetting("eta_noise_seed_delta", p["ENSD"]);  // written only for the samplers that use it: kept otherwise
  const [sampler, sched] = samplerAndSchedule(p["Sampler"], p["Schedule type"]);
  if (sampler) $("sampler").value = sampler.name;
  $("scheduler").value = sched ? sched.name : "automatic";
  setTab(tab);
}

// A1111's get_sampler_and_scheduler (modules/sd_samplers.py), which its paste runs: a schedule named at the
// end of the sampler ("DPM++ 2M Karras", infotexts from before "Schedule type") is split off and wins;
// the sampler is found by name or alias; its own default schedule reads as Automatic. Returns the
// sampler and schedule entries of /sdapi/v1/samplers and /schedulers (null: unknown, or Automatic).
function samplerAndSchedule(samplerName, scheduleType) {
  const lower = (s) => String(s ?? "").toLowerCase();
  const names = (s) => [s.label, s.name, ...(s.aliases || [])].filter(Boolean).map(lower);
  let name = lower(samplerName);
  let sched = ui.schedulers.find((s) => names(s).includes(lower(scheduleType))) || null;
  for (const s of ui.schedulers) {
    const suffix = names(s).find((n) => name.endsWith(" " + n));
    if (suffix) { sched = s; name = name.slice(0, -(suffix.length + 1)); break; }
  }
  const sampler = ui.samplers.find((s) => names(s).includes(name)) || null;
  if (sched && sampler && sampler.options && sampler.options.scheduler === sched.name) sched = null;
  if (sched && sched.name === "automatic") sched = null;
  return [sampler, sched];
}

// -- wiring -------------------------------------------------------------------------------

function wire() {
  document.querySelectorAll(".tabs button").forEach((b) => b.addEventListener("click", () => setTab(b.dataset.tab)));
  $("model").addEventListener("change", switchModel);
  $("generate").addEventListener("click", generate);
  $("interrupt").addEventListener("click", () => api("interrupt", {}).catch((e) => showError(e.message)));
  for (const key of ["seed", "subseed"]) {
    $(`${key}-random`).addEventListener("click", () => { $(key).value = -1; });
    $(`${key}-reuse`).addEventListener("click", () => {
      const r = ui.results[ui.selected];
      if (r) $(key).value = r[key];
    });
  }
  $("denoising_strength").addEventListener("input", (e) => { $("denoising-out").value = e.target.value; });
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
  $("send-img2img").addEventListener("click", () => {
    const r = ui.results[ui.selected];
    if (r) { setInitImage(PNG + r.b64); setTab("img2img"); }
  });
  $("send-pnginfo").addEventListener("click", () => {
    const r = ui.results[ui.selected];
    if (r) { setTab("pnginfo"); readPngInfo(PNG + r.b64); }
  });
  $("png-send-txt2img").addEventListener("click", () => ui.parsed && applyParameters(ui.parsed, "txt2img"));
  $("png-send-img2img").addEventListener("click", () => {
    if (!ui.parsed) return;
    setInitImage($("png-image").src);
    applyParameters(ui.parsed, "img2img");
  });
  dropZone("init-drop", "init-file", setInitImage);
  dropZone("png-drop", "png-file", readPngInfo);
}

wire();
loadLists().then(() => document.body.dataset.ready = "1").catch((e) => showError(e.message));
