// Motif gallery: clips play on hover; the create page submits a job and
// shows its live preview frames from the event stream, then the clip.
"use strict";

function hoverPlay(video) {
  const target = video.closest(".card") || video;
  target.addEventListener("mouseenter", () => { video.play().catch(() => {}); });
  target.addEventListener("mouseleave", () => { video.pause(); video.currentTime = 0; });
}

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf"]');
  return meta ? meta.content : "";
}

// The form's fields as the API's job JSON: empty fields are left to the model.
const NUMBER_FIELDS = { motion: parseFloat, seed: Number, steps: Number, width: Number, height: Number, frames: Number };

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read " + file.name));
    reader.readAsDataURL(file);
  });
}

async function jobFromForm(form) {
  const job = { format: "mp4" };
  for (const name of ["prompt", "negative", "style", "camera", "aspect", "motion", "seed", "steps", "width", "height", "frames"]) {
    const value = form.elements[name].value.trim();
    if (value === "") continue;
    job[name] = NUMBER_FIELDS[name] ? NUMBER_FIELDS[name](value) : value;
  }
  const file = form.elements.image.files[0];
  if (file) job.image = await readFile(file);
  const last = form.elements.last_image.files[0];
  if (last) job.last_image = await readFile(last);
  return job;
}

function setupCreate(form) {
  const $ = (id) => document.getElementById(id);
  const error = $("form-error"), button = $("generate"), status = $("status");
  const preview = $("preview"), progress = $("progress"), video = $("result-video");
  const publish = $("publish-form"), placeholder = $("placeholder");

  function finish(message) {
    button.disabled = false;
    status.textContent = message;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    button.disabled = true;
    publish.hidden = true;
    video.hidden = true;
    video.removeAttribute("src");
    let response, body;
    try {
      const job = await jobFromForm(form);
      response = await fetch("/create/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
        body: JSON.stringify(job),
      });
      body = await response.json();
    } catch (e) {
      error.textContent = String(e.message || e);
      button.disabled = false;
      return;
    }
    if (response.status !== 202) {
      error.textContent = (body.field ? body.field + ": " : "") + (body.error || "refused");
      button.disabled = false;
      return;
    }
    const id = body.id;
    placeholder.hidden = true;
    progress.hidden = false;
    progress.value = 0;
    status.textContent = "Queued…";
    const events = new EventSource("/create/jobs/" + encodeURIComponent(id) + "/events");
    events.addEventListener("state", (e) => {
      const s = JSON.parse(e.data);
      status.textContent = s.state === "queued" ? "Queued (" + (s.queue_position || 0) + " ahead)" : s.state + "…";
    });
    events.addEventListener("progress", (e) => {
      const p = JSON.parse(e.data);
      progress.max = p.total;
      progress.value = p.step;
      status.textContent = "Step " + p.step + " of " + p.total;
      if (p.preview) {
        preview.src = p.preview;
        preview.hidden = false;
      }
    });
    events.addEventListener("done", (e) => {
      events.close();
      const d = JSON.parse(e.data);
      progress.hidden = true;
      if (d.state !== "finished") {
        finish("The job " + d.state + (d.error ? ": " + d.error : "."));
        return;
      }
      preview.hidden = true;
      video.src = "/clips/" + encodeURIComponent(id) + "/video";
      video.hidden = false;
      publish.action = "/jobs/" + encodeURIComponent(id) + "/publish";
      publish.hidden = false;
      video.dataset.job = id;
      finish("Done.");
    });
    events.onerror = () => {
      if (events.readyState === EventSource.CLOSED) finish("Lost the connection to the server.");
    };
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("video.hover-play").forEach(hoverPlay);
  const form = document.getElementById("create-form");
  if (form) setupCreate(form);
});
