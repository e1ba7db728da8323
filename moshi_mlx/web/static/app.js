// The page: one conversation with Moshi over the server's websocket (Kyutai's protocol), with
// raw 16-bit PCM audio at 24 kHz both ways (`?audio=pcm`) and status messages (`?status=1`).
// The audio graph runs at the device's rate; the worklets resample to and from 24 kHz. Written
// for Chromium, Firefox and Safari (WebKit): the AudioContext is made in the click that starts
// the call, and the microphone is released on every way out (Disconnect, even during the
// permission prompt; an error; the server's close; the track ending; the page going away).

const RATE = 24000;
const FRAME = 1920; // samples per 80 ms frame
// The protocol's message kinds, as moshi_mlx/web/protocol.py's Kind (tests/test_protocol.py checks).
const KIND = { handshake: 0, audio: 1, text: 2, metadata: 4, error: 5 };

const ui = {
  button: document.getElementById("connect"),
  state: document.getElementById("state"),
  meter: document.getElementById("meter-level"),
  transcript: document.getElementById("transcript"),
  latency: document.getElementById("latency"),
  dropped: document.getElementById("dropped"),
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

function chatUrl() {
  const url = new URL("api/chat", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.search = "?audio=pcm&status=1";
  return url;
}

function encodeAudio(frame) {
  const message = new DataView(new ArrayBuffer(1 + 2 * frame.length));
  message.setUint8(0, KIND.audio);
  for (let i = 0; i < frame.length; i++) {
    const s = Math.max(-1, Math.min(1, frame[i]));
    message.setInt16(1 + 2 * i, Math.round(s * 32767), true);
  }
  return message.buffer;
}

function decodeAudio(view) {
  const pcm = new Float32Array((view.byteLength - 1) >> 1);
  for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(1 + 2 * i, true) / 32768;
  return pcm;
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
  constructor() {
    this.live = false;
    this.buffered = 0;
    this.closed = false;
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
    await this.context.audioWorklet.addModule("worklets.js");
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
    this.mic.port.onmessage = ({ data }) => this.onMicFrame(data);
    this.source = this.context.createMediaStreamSource(stream);
    this.source.connect(this.mic);
    await this.context.resume();
    if (this.closed) return;

    setState("waiting", "Waiting for Moshi…");
    this.socket = new WebSocket(chatUrl());
    this.socket.binaryType = "arraybuffer";
    this.socket.onmessage = (event) => this.onMessage(new DataView(event.data));
    this.socket.onclose = (event) => this.onClose(event);
  }

  onMicFrame({ frame, level }) {
    showLevel(level);
    if (this.live && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(encodeAudio(frame));
      stats.sentFrames += 1;
    }
  }

  onMessage(view) {
    if (view.byteLength === 0) return;
    const payload = () => new Uint8Array(view.buffer, 1);
    switch (view.getUint8(0)) {
      case KIND.handshake:
        this.live = true;
        setState("live", "Live: talk to Moshi");
        break;
      case KIND.audio: {
        const pcm = decodeAudio(view);
        stats.receivedFrames += pcm.length / FRAME;
        this.player.port.postMessage(pcm, [pcm.buffer]);
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

  releaseMicrophone() {
    this.stream?.getTracks().forEach((track) => track.stop());
  }

  stop() {
    if (this.closed) return;
    this.closed = true;
    this.live = false;
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close(1000);
    this.releaseMicrophone();
    this.context?.close().catch(() => {}); // already closed: nothing to do
    showLevel(0);
    if (call === this) call = null;
    showLag();
  }
}

async function connect() {
  ui.transcript.textContent = "";
  Object.assign(stats, { sentFrames: 0, receivedFrames: 0, playedSamples: 0, underruns: 0,
                         textPieces: 0, server: null, error: null });
  const attempt = new Call();
  call = attempt;
  setState("starting", "Asking for the microphone…");
  try {
    await attempt.start();
  } catch (error) {
    const disconnected = attempt.closed; // then the failure is only the Disconnect's echo
    attempt.stop();
    if (!disconnected) setState("error", `Could not start: ${error.message}`);
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
