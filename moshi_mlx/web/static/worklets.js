// Audio worklets of the page. The AudioContext runs at the device's rate (`sampleRate`, often
// 44.1 or 48 kHz: Firefox cannot connect a microphone to a context at another rate), and Moshi
// speaks 24 kHz: the worklets resample both ways.

const RATE = 24000; // Moshi's sample rate
const FRAME = 1920; // samples per 80 ms frame at RATE

// A streaming resampler: windowed-sinc interpolation (Blackman window), low-passed below the
// lower of the two Nyquist frequencies so that nothing aliases. Written here because the Web
// Audio API has none that a worklet can use on a stream (the browser's own resampling is what
// Firefox refuses between a microphone and a context of another rate).
const ZEROS = 16; // zero crossings of the sinc on each side
const PHASES = 512; // kernel positions tabulated between two input samples

class Resampler {
  constructor(inRate, outRate) {
    this.step = inRate / outRate; // input samples per output sample
    const cutoff = 0.95 * Math.min(1, outRate / inRate); // of the input's Nyquist frequency
    this.half = Math.ceil(ZEROS / cutoff); // input samples on each side of an output sample
    const taps = 2 * this.half;
    // kernel[p * taps + k]: the weight of input sample (i - half + 1 + k) for an output at
    // i + p / PHASES; each row sums to 1 (a constant goes through unchanged).
    this.kernel = new Float32Array((PHASES + 1) * taps);
    for (let p = 0; p <= PHASES; p++) {
      let sum = 0;
      for (let k = 0; k < taps; k++) {
        const x = p / PHASES + this.half - 1 - k; // distance from the output, input samples
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * cutoff * x) / (Math.PI * cutoff * x);
        const w = (x + this.half) / taps; // 0..1 across the window
        const blackman = 0.42 - 0.5 * Math.cos(2 * Math.PI * w) + 0.08 * Math.cos(4 * Math.PI * w);
        this.kernel[p * taps + k] = sinc * Math.max(0, blackman);
        sum += this.kernel[p * taps + k];
      }
      for (let k = 0; k < taps; k++) this.kernel[p * taps + k] /= sum;
    }
    this.buffer = new Float32Array(taps + 4096);
    this.length = this.half; // zeros before the first input sample
    this.time = this.half; // position of the next output sample in `buffer`: the first input
  }

  // Input samples (Float32Array) -> the output samples they complete (Float32Array).
  push(input) {
    if (this.length + input.length > this.buffer.length) {
      const grown = new Float32Array(2 * (this.length + input.length));
      grown.set(this.buffer.subarray(0, this.length));
      this.buffer = grown;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const taps = 2 * this.half;
    // Outputs whose last tap has come (one may wait for the next push when rounding is close).
    const count = Math.max(0, Math.floor((this.length - this.half - this.time) / this.step));
    const output = new Float32Array(count);
    for (let n = 0; n < count; n++) {
      const i = Math.floor(this.time);
      const row = Math.round((this.time - i) * PHASES) * taps;
      const first = i - this.half + 1;
      let y = 0;
      for (let k = 0; k < taps; k++) y += this.kernel[row + k] * this.buffer[first + k];
      output[n] = y;
      this.time += this.step;
    }
    const keep = Math.floor(this.time) - this.half + 1; // samples still needed start here
    this.buffer.copyWithin(0, keep, this.length);
    this.length -= keep;
    this.time -= keep;
    return output;
  }
}

// The microphone at 24 kHz, cut into frames: posts {frame: Float32Array(FRAME), level: RMS}
// per frame.
class MicCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(sampleRate, RATE);
    this.frame = new Float32Array(FRAME);
    this.filled = 0;
  }

  process(inputs) {
    const channel = inputs[0][0];
    if (!channel) return true;
    const samples = this.resampler.push(channel);
    let offset = 0;
    while (offset < samples.length) {
      const n = Math.min(samples.length - offset, FRAME - this.filled);
      this.frame.set(samples.subarray(offset, offset + n), this.filled);
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

// Moshi's voice: plays the 24 kHz frames posted to it (Float32Array each), resampled to the
// device's rate, through a small jitter buffer. It starts (and restarts after running dry) once
// START is queued, and skips ahead when more than MAX is, so the delay stays small. Posts
// {buffered, played, underruns}, counted in 24 kHz samples.
const START = FRAME * 1.5;
const MAX = FRAME * 6;

class VoicePlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.resampler = new Resampler(RATE, sampleRate);
    this.perSample = RATE / sampleRate; // 24 kHz samples per sample played
    this.start = START / this.perSample; // in samples played
    this.max = MAX / this.perSample;
    this.chunks = [];
    this.offset = 0; // position in chunks[0]
    this.buffered = 0;
    this.playing = false;
    this.played = 0;
    this.underruns = 0;
    this.sinceReport = 0;
    this.port.onmessage = ({ data }) => {
      const chunk = this.resampler.push(data);
      this.chunks.push(chunk);
      this.buffered += chunk.length;
      while (this.buffered - this.chunks[0].length + this.offset > this.start
             && this.buffered > this.max) {
        this.buffered -= this.chunks.shift().length - this.offset;
        this.offset = 0;
      }
    };
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered >= this.start) this.playing = true;
    let written = 0;
    while (this.playing && written < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const n = Math.min(out.length - written, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + n), written);
      written += n;
      this.offset += n;
      this.buffered -= n;
      if (this.offset === chunk.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    if (this.playing && written < out.length) {
      this.playing = false;
      this.underruns += 1;
    }
    out.fill(0, written);
    this.played += written;
    this.sinceReport += out.length * this.perSample;
    if (this.sinceReport >= FRAME) {
      this.sinceReport = 0;
      this.port.postMessage({
        buffered: Math.round(this.buffered * this.perSample),
        played: Math.round(this.played * this.perSample),
        underruns: this.underruns,
      });
    }
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
registerProcessor("voice-player", VoicePlayer);
