// Audio worklets of the page, in an AudioContext running at 24 kHz (Moshi's rate).

const FRAME = 1920; // samples per 80 ms frame

// The microphone, cut into frames: posts {frame: Float32Array(FRAME), level: RMS} per frame.
class MicCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frame = new Float32Array(FRAME);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0][0];
    if (!channel) return true;
    let offset = 0;
    while (offset < channel.length) {
      const n = Math.min(channel.length - offset, FRAME - this.filled);
      this.frame.set(channel.subarray(offset, offset + n), this.filled);
      this.filled += n;
      offset += n;
      if (this.filled === FRAME) {
        let energy = 0;
        for (const s of this.frame) energy += s * s;
        const frame = this.frame;
        this.port.postMessage({ frame, level: Math.sqrt(energy / FRAME) }, [frame.buffer]);
        this.frame = new Float32Array(FRAME);
        this.filled = 0;
      }
    }
    return true;
  }
}

// Moshi's voice: plays the frames posted to it (Float32Array each) through a small jitter
// buffer. It starts (and restarts after running dry) once START samples are queued, and skips
// ahead when more than MAX are, so the delay stays small. Posts {buffered, played, underruns}.
const START = FRAME * 1.5;
const MAX = FRAME * 6;

class VoicePlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.frames = [];
    this.offset = 0; // position in frames[0]
    this.buffered = 0;
    this.playing = false;
    this.played = 0;
    this.underruns = 0;
    this.sinceReport = 0;
    this.port.onmessage = ({ data }) => {
      if (data === "clear") {
        this.frames = [];
        this.offset = this.buffered = 0;
        this.playing = false;
        return;
      }
      this.frames.push(data);
      this.buffered += data.length;
      while (this.buffered - this.frames[0].length + this.offset > START && this.buffered > MAX) {
        this.buffered -= this.frames.shift().length - this.offset;
        this.offset = 0;
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered >= START) this.playing = true;
    let written = 0;
    while (this.playing && written < out.length && this.frames.length) {
      const frame = this.frames[0];
      const n = Math.min(out.length - written, frame.length - this.offset);
      out.set(frame.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      this.buffered -= n;
      if (this.offset === frame.length) {
        this.frames.shift();
        this.offset = 0;
      }
    }
    if (this.playing && written < out.length) {
      this.playing = false;
      this.underruns += 1;
    }
    out.fill(0, written);
    this.played += written;
    this.sinceReport += out.length;
    if (this.sinceReport >= FRAME) {
      this.sinceReport = 0;
      this.port.postMessage({
        buffered: this.buffered, played: this.played, underruns: this.underruns,
      });
    }
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
registerProcessor("voice-player", VoicePlayer);
