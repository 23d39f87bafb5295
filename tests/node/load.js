// A load generator that measures itself: COUNT requests to URL at RATE per
// second over CONNS keep-alive connections (or a new connection each
// time with "close"; "linger": kept, and left open and idle for 7 s after
// the last answer, for the server to close); each request's latency from its start to the
// first byte of its response (the 'response' event). Prints one JSON
// line: {"pid", "sent", "statuses": {code: n}, "p50_ms", "p99_ms", "max_ms"}.
//
//   node load.js URL COUNT RATE CONNS [keepalive|close|linger]
'use strict';
const http = require('http');

const [url, count, rate, conns, mode] = process.argv.slice(2);
const total = Number(count);
const keepAlive = (mode || 'keepalive') !== 'close';
const linger = mode === 'linger';
const agent = new http.Agent({ keepAlive, maxSockets: Number(conns) });
const latencies = [];
const statuses = {};
let sent = 0;
let done = 0;

function one() {
  const t0 = process.hrtime.bigint();
  sent++;
  const req = http.get(url, { agent }, (res) => {
    latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
    statuses[res.statusCode] = (statuses[res.statusCode] || 0) + 1;
    res.resume();
    res.on('end', () => {
      done++;
      if (done === total) finish();
    });
  });
  req.on('error', (e) => {
    console.error(e.message);
    process.exit(1);
  });
}

function pct(sorted, q) {
  return sorted[Math.max(0, Math.ceil(q * sorted.length) - 1)];
}

function finish() {
  if (linger) {
    setTimeout(() => process.exit(0), 7000);
  } else {
    agent.destroy();
  }
  const s = latencies.slice().sort((a, b) => a - b);
  console.log(JSON.stringify({
    pid: process.pid, sent, statuses, p50_ms: pct(s, 0.5), p99_ms: pct(s, 0.99), max_ms: s[s.length - 1],
  }));
}

const timer = setInterval(() => {
  one();
  if (sent === total) clearInterval(timer);
}, 1000 / Number(rate));
