// The page: one conversation with Moshi over the server's websocket (Kyutai's protocol), with
// raw 16-bit PCM audio at 24 kHz both ways (`?audio=pcm`), status messages (`?status=1`) and the
// user's sampling settings (Kyutai's query names). The audio graph runs at the device's rate;
// the worklets resample to and from 24 kHz. Written for Chromium, Firefox and Safari (WebKit):
// the AudioContext is made in the click that starts the call, each wait before the call is
// live has a deadline, the microphone is released on every way out (Disconnect, even during
// the permission prompt; an error; a deadline; the server's close; the track ending; the page
// going away), and the conversation's recording is offered for download once it ends.

const RATE = 24000;
const FRAME = 1920; // samples per 80 ms frame
// The protocol's message kinds, as moshi_mlx/web/protocol.py's Kind (tests/test_protocol.py checks).
const KIND = { handshake: 0, audio: 1, text: 2, metadata: 4, error: 5 };

// Every wait before the call is live has a deadline (ms) and a message that says what to do; a
// live call has none. The handshake's outlasts the server's own deadlines (Mimi's load: 60 s).
// The permission prompt has none: the user decides. Tests may shorten them (window.deadlines).
const deadlines = {
  worklets: 10000, audio: 5000, microphone: 5000, handshake: 75000, settings: 5000,
};
window.deadlines = deadlines;
const TOO_LATE = {
  worklets: "the page's audio code did not load. Reload the page and try again.",
  audio: "the browser's audio did not start. Check that a speaker or headphones are " +
    "connected (on Linux: that a sound server such as PulseAudio or PipeWire runs), " +
    "then try again.",
  microphone: "the microphone gives no sound. Check that it is connected and not in use " +
    "by another application, then try again.",
  handshake: "Moshi did not answer. The server may be overloaded or stuck: look at its " +
    "log, then try again.",
};

// `promise`, or a rejection with TOO_LATE[step] once deadlines[step] has passed.
function within(step, promise) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(TOO_LATE[step])), deadlines[step]);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

const ui = {
  button: document.getElementById("connect"),
  state: document.getElementById("state"),
  meter: document.getElementById("meter-level"),
  transcript: document.getElementById("transcript"),
  latency: document.getElementById("latency"),
  dropped: document.getElementById("dropped"),
  settings: document.getElementById("settings"),
  settingsReset: document.getElementById("settings-reset"),
  settingsNote: document.getElementById("settings-note"),
  recordingBox: document.getElementById("recording-box"),
  recording: document.getElementById("recording"),
  recordingAbout: document.getElementById("recording-about"),
};

// What the page has done so far, for a glance in the console (and for tests).
const stats = {
  state: "idle", sentFrames: 0, receivedFrames: 0, playedSamples: 0, underruns: 0,
  textPieces: 0, server: null, error: null, sampleRate: null,
};
window.stats = stats;

let call = null; // the conversation in progress

function setState(state, text) {
  stats.state = state;
  ui.state.textContent = text;
  document.body.dataset.state = state;
  const busy = state === "starting" || state === "waiting" || state === "live";
  ui.button.textContent = busy ? "Disconnect" : "Connect";
  ui.button.setAttribute("aria-pressed", String(busy));
}

// The sampling settings: the server's defaults and ranges (api/sampling), the user's values
// kept in localStorage for the next visit, sent as the URL query of Kyutai's web client.
const SETTINGS_KEY = "moshi.sampling";
const LABELS = {
  text_temperature: "Text temperature", text_topk: "Text top-k",
  audio_temperature: "Audio temperature", audio_topk: "Audio top-k",
};
let ranges = null; // query name -> {default, min, max?, integer}

function savedSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch {
    return {}; // unreadable: the server's defaults
  }
}

async function loadSettings() {
  try {
    const response = await fetch("api/sampling", { signal: AbortSignal.timeout(deadlines.settings) });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    ranges = await response.json();
  } catch (error) {
    ui.settings.querySelectorAll("input, button").forEach((input) => { input.disabled = true; });
    ui.settingsNote.textContent =
      `The server's settings could not be read (${error.message}): its defaults apply.`;
    return;
  }
  const saved = savedSettings();
  for (const [name, range] of Object.entries(ranges)) {
    const input = ui.settings.elements[name];
    input.min = range.min;
    if (range.max !== undefined) input.max = range.max;
    input.value = name in saved ? saved[name] : range.default;
  }
  checkSettings();
}

// "" when `range` allows `text`, else what it must be.
function problemWith(text, range) {
  const value = Number(text);
  const whole = range.integer ? "a whole number" : "a number";
  const valid = range.max !== undefined
    ? `${whole} from ${range.min} to ${range.max}` : `${whole} of ${range.min} or more`;
  const ok = text.trim() !== "" && Number.isFinite(value) && value >= range.min
    && (range.max === undefined || value <= range.max) && (!range.integer || Number.isInteger(value));
  return ok ? "" : `must be ${valid}`;
}

// Checks the form: the query to send, or null (the problems are shown). Valid values are kept.
function checkSettings() {
  if (!ranges) return new URLSearchParams();
  const query = new URLSearchParams();
  const problems = [];
  for (const [name, range] of Object.entries(ranges)) {
    const input = ui.settings.elements[name];
    const problem = problemWith(input.value, range);
    input.setAttribute("aria-invalid", String(problem !== ""));
    if (problem) problems.push(`${LABELS[name]} ${problem}.`);
    else query.set(name, String(Number(input.value)));
  }
  const values = Object.fromEntries(query);
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify({ ...savedSettings(), ...values }));
  } catch {
    // storage refused (private browsing): the values apply to this visit only
  }
  ui.settingsNote.dataset.problem = String(problems.length > 0);
  ui.settingsNote.textContent = problems.length ? problems.join(" ")
    : "Kept for your next visit; a change applies at the next Connect.";
  return problems.length ? null : query;
}

ui.settings.addEventListener("input", () => checkSettings());
ui.settingsReset.addEventListener("click", () => {
  if (!ranges) return;
  for (const [name, range] of Object.entries(ranges)) ui.settings.elements[name].value = range.default;
  checkSettings();
});

function chatUrl(settings) {
  const url = new URL("api/chat", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = `?audio=pcm&status=1&${settings}`;
  return url;
}

function toInt16(frame) {
  const pcm = new Int16Array(frame.length);
  for (let i = 0; i < frame.length; i++) {
    pcm[i] = Math.round(Math.max(-1, Math.min(1, frame[i])) * 32767);
  }
  return pcm;
}

function encodeAudio(pcm) {
  const message = new DataView(new ArrayBuffer(1 + 2 * pcm.length));
  message.setUint8(0, KIND.audio);
  for (let i = 0; i < pcm.length; i++) message.setInt16(1 + 2 * i, pcm[i], true);
  return message.buffer;
}

function decodeAudio(view) {
  const pcm = new Int16Array((view.byteLength - 1) >> 1);
  for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(1 + 2 * i, true);
  return pcm;
}

// Both voices of a conversation at 24 kHz, 16 bits: left the user as sent, right Moshi as
// received, each frame of Moshi placed where the user's audio stood when it arrived (or right
// after the previous one), so the two line up as they were heard.
class Recording {
  constructor() {
    this.user = [];
    this.userLength = 0;
    this.moshi = []; // [offset in samples, Int16Array]
    this.moshiEnd = 0;
  }

  addUser(pcm) {
    this.user.push(pcm);
    this.userLength += pcm.length;
  }

  addMoshi(pcm) {
    const at = Math.max(this.userLength, this.moshiEnd);
    this.moshi.push([at, pcm]);
    this.moshiEnd = at + pcm.length;
  }

  get length() {
    return Math.max(this.userLength, this.moshiEnd);
  }

  // A stereo WAV file (RIFF, PCM 16-bit little-endian).
  wav() {
    const frames = this.length;
    const left = new Int16Array(frames);
    let at = 0;
    for (const pcm of this.user) { left.set(pcm, at); at += pcm.length; }
    const right = new Int16Array(frames);
    for (const [offset, pcm] of this.moshi) right.set(pcm, offset);
    const view = new DataView(new ArrayBuffer(44 + 4 * frames));
    const text = (offset, chars) => [...chars].forEach((c, i) => view.setUint8(offset + i, c.charCodeAt(0)));
    text(0, "RIFF"); view.setUint32(4, 36 + 4 * frames, true); text(8, "WAVE");
    text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
    view.setUint16(22, 2, true); view.setUint32(24, RATE, true); view.setUint32(28, 4 * RATE, true);
    view.setUint16(32, 4, true); view.setUint16(34, 16, true);
    text(36, "data"); view.setUint32(40, 4 * frames, true);
    for (let i = 0; i < frames; i++) {
      view.setInt16(44 + 4 * i, left[i], true);
      view.setInt16(46 + 4 * i, right[i], true);
    }
    return new Blob([view.buffer], { type: "audio/wav" });
  }
}

// Offers the last conversation's recording for download (replacing the one before).
function offerRecording(recording) {
  if (ui.recording.href.startsWith("blob:")) URL.revokeObjectURL(ui.recording.href);
  ui.recordingBox.hidden = recording.length === 0;
  if (recording.length === 0) return;
  const seconds = Math.round(recording.length / RATE);
  const stamp = new Date().toISOString().slice(0, 19).replace(/[T:]/g, "-");
  ui.recording.href = URL.createObjectURL(recording.wav());
  ui.recording.download = `moshi-${stamp}.wav`;
  ui.recordingAbout.textContent =
    `(${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}, you left, Moshi right)`;
}

function showLevel(rms) {
  const db = 20 * Math.log10(rms + 1e-9); // -60 dBFS .. 0 dBFS across the bar
  const fraction = Math.max(0, Math.min(1, (db + 60) / 60));
  ui.meter.style.transform = `scaleX(${fraction})`;
}

function showLag() {
  const server = stats.server;
  if (!call || !server) {
    ui.latency.textContent = "–";
    ui.dropped.textContent = "–";
    return;
  }
  // The server measures from the arrival of your audio to Moshi's voice leaving it (p50, p95);
  // the audio buffered here for playback comes on top.
  const playbackMs = (call.buffered / RATE) * 1000;
  const voice = server.latency_voice_ms || {};
  const lagMs = (voice.p50 ?? 0) + playbackMs;
  const p95Ms = (voice.p95 ?? 0) + playbackMs;
  ui.latency.textContent = `${Math.round(lagMs)} ms (p95 ${Math.round(p95Ms)} ms)`;
  ui.dropped.textContent = String(server.dropped);
  document.body.dataset.lagging = String(lagMs > 600 || server.dropped > 0);
}

function addText(piece) {
  stats.textPieces += 1;
  const atBottom =
    ui.transcript.scrollHeight - ui.transcript.scrollTop - ui.transcript.clientHeight < 24;
  ui.transcript.append(ui.transcript.textContent ? piece : piece.trimStart());
  if (atBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

class Call {
  constructor(settings) {
    this.settings = settings; // the URL query of the sampling settings
    this.live = false;
    this.buffered = 0;
    this.closed = false;
    this.recording = new Recording();
  }

  async start() {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error("this page needs https (start the server with --ssl) or localhost " +
        "to use the microphone");
    }
    if (!window.AudioWorkletNode) {
      throw new Error("this browser has no AudioWorklet (Safari needs version 14.1 or later)");
    }
    // In the click itself (Safari lets only a user's gesture start audio), at the device's rate
    // (Firefox connects no microphone to a context at another rate).
    this.context = new AudioContext({ latencyHint: "interactive" });
    stats.sampleRate = this.context.sampleRate;
    await within("worklets", this.context.audioWorklet.addModule("worklets.js"));
    if (this.closed) return;
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true,
               channelCount: 1 },
    });
    this.stream = stream;
    if (this.closed) { // Disconnect was pressed during the permission prompt
      this.releaseMicrophone();
      return;
    }
    for (const track of stream.getAudioTracks()) {
      track.addEventListener("ended", () => this.end("The microphone was turned off."));
    }
    this.player = new AudioWorkletNode(this.context, "voice-player");
    this.player.connect(this.context.destination);
    this.player.port.onmessage = ({ data }) => {
      this.buffered = data.buffered;
      stats.playedSamples = data.played;
      stats.underruns = data.underruns;
    };
    this.mic = new AudioWorkletNode(this.context, "mic-capture", { numberOfOutputs: 0 });
    const heard = new Promise((resolve) => { this.heard = resolve; });
    this.mic.port.onmessage = ({ data }) => this.onMicFrame(data);
    this.source = this.context.createMediaStreamSource(stream);
    this.source.connect(this.mic);
    await within("audio", this.context.resume());
    if (this.closed) return;
    await within("microphone", heard);
    if (this.closed) return;

    setState("waiting", "Waiting for Moshi…");
    this.socket = new WebSocket(chatUrl(this.settings));
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.onMessage(new DataView(event.data));
    this.socket.onclose = (event) => this.onClose(event);
    this.handshakeTimer = setTimeout(() => this.fail(TOO_LATE.handshake), deadlines.handshake);
  }

  onMicFrame({ frame, level }) {
    this.heard();
    showLevel(level);
    if (this.live && this.socket.readyState === WebSocket.OPEN) {
      const pcm = toInt16(frame);
      this.socket.send(encodeAudio(pcm));
      this.recording.addUser(pcm);
      stats.sentFrames += 1;
    }
  }

  onMessage(view) {
    if (view.byteLength === 0) return;
    const payload = () => new Uint8Array(view.buffer, 1);
    switch (view.getUint8(0)) {
      case KIND.handshake:
        clearTimeout(this.handshakeTimer);
        this.live = true;
        setState("live", "Live: talk to Moshi");
        break;
      case KIND.audio: {
        const pcm = decodeAudio(view);
        stats.receivedFrames += pcm.length / FRAME;
        this.recording.addMoshi(pcm);
        const voice = Float32Array.from(pcm, (s) => s / 32768);
        this.player.port.postMessage(voice, [voice.buffer]);
        break;
      }
      case KIND.text:
        addText(new TextDecoder().decode(payload()));
        break;
      case KIND.metadata: {
        const data = JSON.parse(new TextDecoder().decode(payload()));
        if (data.type === "status") {
          stats.server = data;
          showLag();
        }
        break;
      }
      case KIND.error:
        stats.error = new TextDecoder().decode(payload());
        break;
      default:
        break; // unknown kinds are ignored, as the protocol says
    }
  }

  onClose(event) {
    if (this.closed) return; // the page ended the call: its own words stand
    const wasLive = this.live;
    this.stop();
    if (stats.error?.startsWith("busy")) {
      setState("busy", "Moshi is in another conversation. Try again when it ends.");
    } else if (stats.error) {
      setState("error", `The server ended the conversation: ${stats.error}`);
    } else if (!wasLive && !event.wasClean) {
      setState("error", "Could not reach the server.");
    } else if (event.reason) {
      setState("idle", `The server ended the conversation: ${event.reason}.`);
    } else {
      setState("idle", "Disconnected.");
    }
  }

  // Ends the call from the page's side, saying why.
  end(text) {
    this.stop();
    setState("idle", text);
  }

  // Ends the call from the page's side on a failure to start.
  fail(reason) {
    this.stop();
    setState("error", `Could not start: ${reason}`);
  }

  releaseMicrophone() {
    this.stream?.getTracks().forEach((track) => track.stop());
  }

  stop() {
    if (this.closed) return;
    this.closed = true;
    this.live = false;
    clearTimeout(this.handshakeTimer);
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
    this.releaseMicrophone();
    this.context?.close().catch(() => {}); // already closed: nothing to do
    offerRecording(this.recording);
    showLevel(0);
    if (call === this) call = null;
    showLag();
  }
}

async function connect() {
  const settings = checkSettings();
  if (settings === null) {
    setState("error", "Could not start: a setting is out of its range (see Settings).");
    ui.settings.parentElement.open = true;
    return;
  }
  ui.transcript.textContent = "";
  Object.assign(stats, { sentFrames: 0, receivedFrames: 0, playedSamples: 0, underruns: 0,
                         textPieces: 0, server: null, error: null });
  const attempt = new Call(settings);
  call = attempt;
  setState("starting", "Asking for the microphone…");
  try {
    await attempt.start();
  } catch (error) {
    // Once closed (Disconnect), the failure is only the Disconnect's echo.
    if (!attempt.closed) attempt.fail(error.message);
  }
}

ui.button.addEventListener("click", () => {
  if (call) {
    call.end("Disconnected.");
  } else {
    connect();
  }
});

// Leaving the page (or putting it in the back-forward cache) ends the call.
window.addEventListener("pagehide", () => call?.end("Disconnected."));

setState("idle", "Press Connect and talk: Moshi listens and answers at the same time.");
loadSettings();
