// An event loop blocked at a known pace for a known time, measured by
// Node's own perf_hooks.monitorEventLoopDelay at the same time.
//
//   node stall.js block COUNT MS EVERY_MS   block COUNT times, MS each
//   node stall.js idle SECONDS              wait in the loop, do nothing
//
// Prints one JSON line when done: {"blocks": n, "max_delay_ms": m,
// "pid": p}.
'use strict';
const { monitorEventLoopDelay } = require('perf_hooks');

function blockTheLoop(ms) {
  const end = Date.now() + ms;
  let n = 0;
  while (Date.now() < end) {
    n++;
  }
  return n;
}

const [mode, a, b, c] = process.argv.slice(2);
const h = monitorEventLoopDelay({ resolution: 5 });
h.enable();

function done(blocks) {
  h.disable();
  console.log(JSON.stringify({ blocks, max_delay_ms: h.max / 1e6, pid: process.pid }));
}

if (mode === 'idle') {
  setTimeout(() => done(0), Number(a) * 1000);
} else {
  const count = Number(a);
  const ms = Number(b);
  const every = Number(c);
  let blocks = 0;
  // Small work between the blocks, as a service would do.
  const tick = setInterval(() => JSON.stringify({ t: Date.now() }), 10);
  const timer = setInterval(() => {
    blockTheLoop(ms);
    blocks++;
    if (blocks === count) {
      clearInterval(timer);
      clearInterval(tick);
      setTimeout(() => done(blocks), every);
    }
  }, every);
}
