// scope-trio status page: live cloud status over SSE, connect/disconnect, a relay stream.
"use strict";

const $ = (id) => document.getElementById(id);
let status = null;
let config = { debug_endpoints: false, version: "" };

// ------------------------------------------------------------------ API helpers

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!response.ok) {
    throw new Error((data && data.detail) || `${response.status} ${response.statusText}`);
  }
  return data;
}

function show(el, text) {
  el.textContent = text || "";
  el.hidden = !text;
}

// ------------------------------------------------------------------ cloud status

// "reconnecting (2/3)": the attempt under way (or the last one, while waiting out a backoff)
// of the outage's budget; plain "reconnecting" before the first attempt starts.
function reconnecting(s) {
  const n = s.webrtc_reconnect_attempt;
  const max = s.webrtc_reconnect_max_attempts;
  return n > 0 && max > 0 ? `reconnecting (${n}/${max})` : "reconnecting";
}

function describe(s) {
  if (s.connected && s.webrtc_reconnecting) {
    return ["busy", "Reconnecting", `Connected to the cloud; rebuilding the video session: ${reconnecting(s)}…`];
  }
  if (s.connected && s.webrtc_connected) return ["ok", "Streaming", "Connected; the cloud video session is live."];
  if (s.connected) return ["ok", "Connected", "Connected to the cloud. Start a stream below."];
  if (s.connecting) return ["busy", "Connecting", s.connect_stage || "Connecting to the cloud…"];
  if (s.error) return ["bad", "Error", "Not connected."];
  return ["off", "Disconnected", "Not connected. Press Connect to start."];
}

function render(s) {
  status = s;
  const [kind, label, headline] = describe(s);
  const pill = $("pill");
  pill.className = `pill pill-${kind}`;
  pill.textContent = label;
  $("headline").textContent = headline;
  show($("stage"), s.connecting && s.connect_stage ? s.connect_stage : "");
  show($("error"), s.error || "");
  $("connect").disabled = s.connecting || s.connected;
  $("disconnect").disabled = !s.connected && !s.connecting;
  $("simulate").hidden = !config.debug_endpoints;
  $("simulate").disabled = !s.webrtc_connected;
  const rows = {
    "Cloud link": s.connected ? "up" : s.connecting ? "connecting" : "down",
    "Video session": s.webrtc_connected ? "connected" : s.webrtc_reconnecting ? reconnecting(s) : "none",
    "Connection id": s.connection_id || "–",
    "App id": s.app_id || "–",
    "Credentials": s.credentials_configured ? "configured" : "not configured",
    "Last close": s.last_close_code ? `${s.last_close_code} ${s.last_close_reason || ""}` : "–",
  };
  fill($("details"), rows);
  fill($("counters"), s.stats || { "(not connected)": "" });
}

function fill(dl, rows) {
  dl.replaceChildren();
  for (const [key, value] of Object.entries(rows)) {
    const dt = document.createElement("dt");
    dt.textContent = key.replaceAll("_", " ");
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    dl.append(dt, dd);
  }
}

function listen() {
  const events = new EventSource("/api/v1/cloud/events");
  events.onmessage = (event) => render(JSON.parse(event.data));
  events.onerror = () => {
    const pill = $("pill");
    pill.className = "pill pill-bad";
    pill.textContent = "Server unreachable";
    $("headline").textContent = "Lost the connection to scope-trio; retrying…";
  };
}

// The buttons only act: the event stream renders every change, in order. Rendering a
// button's response as well could paint a status older than one the stream already showed.
async function act(path) {
  try { await api("POST", path, path.endsWith("/connect") ? {} : undefined); }
  catch (err) { show($("error"), err.message); }
}
$("connect").onclick = () => act("/api/v1/cloud/connect");
$("disconnect").onclick = () => act("/api/v1/cloud/disconnect");
$("simulate").onclick = () => act("/api/v1/cloud/debug/disconnect-webrtc");

// ------------------------------------------------------------------ stream (relay)

let pc = null;
let channel = null;
let sessionId = null;
let localStream = null;
let patternTimer = null;

function setStream(kind, label) {
  const pill = $("stream-pill");
  pill.className = `pill pill-${kind}`;
  pill.textContent = label;
}

function testPattern() {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 512;
  const ctx = canvas.getContext("2d");
  const colors = ["#fff", "#ff0", "#0ff", "#0f0", "#f0f", "#f00", "#00f", "#000"];
  let t = 0;
  patternTimer = setInterval(() => {
    t += 1;
    colors.forEach((c, i) => { ctx.fillStyle = c; ctx.fillRect(i * 64, 0, 64, 512); });
    ctx.fillStyle = "rgba(0,0,0,.65)";
    ctx.fillRect(0, 220, 512, 72);
    ctx.fillStyle = "#fff";
    ctx.font = "bold 40px system-ui, sans-serif";
    ctx.fillText(`test pattern ${(t / 30).toFixed(1)} s`, 40, 270);
    ctx.beginPath();
    ctx.arc(256 + 200 * Math.sin(t / 20), 420, 30, 0, 2 * Math.PI);
    ctx.fill();
  }, 1000 / 30);
  return canvas.captureStream(30);
}

async function cameraOrPattern() {
  try {
    if (navigator.mediaDevices && navigator.mediaDevices.getUserMedia) {
      return await navigator.mediaDevices.getUserMedia({ video: { width: 512, height: 512 }, audio: false });
    }
  } catch (err) {
    console.info("no camera, using a test pattern:", err);
  }
  return testPattern();
}

function initialParameters() {
  return { prompts: [{ text: $("prompt").value, weight: 1.0 }] };
}

async function startStream() {
  show($("stream-error"), "");
  $("start").disabled = true;
  setStream("busy", "Starting");
  try {
    localStream = await cameraOrPattern();
    $("local").srcObject = localStream;
    const ice = await api("GET", "/api/v1/webrtc/ice-servers");
    pc = new RTCPeerConnection({ iceServers: ice.iceServers });
    channel = pc.createDataChannel("parameters", { ordered: true });
    channel.onopen = () => { $("send-prompt").disabled = false; };
    channel.onclose = () => { $("send-prompt").disabled = true; };
    for (const track of localStream.getVideoTracks()) pc.addTrack(track, localStream);
    pc.ontrack = (event) => {
      $("remote").srcObject = event.streams[0] || new MediaStream([event.track]);
    };
    const pending = [];
    pc.onicecandidate = (event) => {
      if (!event.candidate) return;
      const c = { candidate: event.candidate.candidate, sdpMid: event.candidate.sdpMid,
        sdpMLineIndex: event.candidate.sdpMLineIndex };
      if (sessionId) sendCandidates([c]); else pending.push(c);
    };
    pc.onconnectionstatechange = () => {
      const state = pc ? pc.connectionState : "closed";
      if (state === "connected") setStream("ok", "Live");
      else if (state === "failed" || state === "disconnected") setStream("bad", state);
    };
    await pc.setLocalDescription(await pc.createOffer());
    const answer = await api("POST", "/api/v1/webrtc/offer", {
      sdp: pc.localDescription.sdp, type: "offer", initialParameters: initialParameters(),
    });
    sessionId = answer.sessionId;
    await pc.setRemoteDescription({ type: answer.type, sdp: answer.sdp });
    if (pending.length) sendCandidates(pending.splice(0));
    $("stop").disabled = false;
  } catch (err) {
    show($("stream-error"), err.message);
    await stopStream();
  }
}

function sendCandidates(candidates) {
  const id = sessionId;
  api("PATCH", `/api/v1/webrtc/offer/${encodeURIComponent(id)}`, { candidates })
    .catch((err) => console.warn("ICE candidates not accepted:", err.message));
}

async function stopStream() {
  const id = sessionId;
  sessionId = null;
  if (id) {
    try { await api("DELETE", `/api/v1/webrtc/offer/${encodeURIComponent(id)}`); } catch { /* gone */ }
  }
  if (pc) pc.close();
  pc = null;
  channel = null;
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  localStream = null;
  if (patternTimer) clearInterval(patternTimer);
  patternTimer = null;
  $("local").srcObject = null;
  $("remote").srcObject = null;
  $("start").disabled = false;
  $("stop").disabled = true;
  $("send-prompt").disabled = true;
  setStream("off", "Idle");
}

$("start").onclick = startStream;
$("stop").onclick = stopStream;
$("prompt-form").onsubmit = (event) => {
  event.preventDefault();
  if (channel && channel.readyState === "open") {
    channel.send(JSON.stringify({ prompts: [{ text: $("prompt").value, weight: 1.0 }] }));
  }
};
window.addEventListener("pagehide", () => {
  // Best effort: the server also ends the session when the browser's connection closes.
  if (sessionId) fetch(`/api/v1/webrtc/offer/${encodeURIComponent(sessionId)}`, { method: "DELETE", keepalive: true });
});

// ------------------------------------------------------------------ start

(async () => {
  try {
    config = await api("GET", "/api/v1/config");
    $("version").textContent = `v${config.version}`;
  } catch { /* older server: no debug flag */ }
  listen();
  setInterval(async () => {
    if (document.hidden || !status || !status.connected) return;
    try {
      const stats = await api("GET", "/api/v1/cloud/stats");
      fill($("counters"), stats.stats || {});
    } catch { /* the SSE handler reports outages */ }
  }, 2000);
})();
