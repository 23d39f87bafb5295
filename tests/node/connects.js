// Outbound connections with known outcomes, each timed by this client:
//   $SLOW_PORT    one connect to a listener whose accept queue is full at
//                 first: its SYN is dropped and retransmitted a second
//                 later (the handshake takes ~1 s)
//   $ECHO_PORT    20 connects, one after the other, each with one round
//                 trip, then closed
//   $CLOSED_PORT  5 connects to a port nobody listens on (refused)
//   a server of its own that resets each connection on its first bytes:
//                 5 connects, each reset
// Prints one JSON line: pid, connect_ms (each handshake to the echo
// server, net.connect() to 'connect'), slow_ms, refused, reset.
'use strict';
const net = require('net');
const { performance } = require('perf_hooks');

function connectOnce(port, onConnect) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const s = net.connect(port, '127.0.0.1');
    s.on('connect', () => onConnect(s, performance.now() - t0, resolve));
    s.on('error', (e) => resolve({ error: e.code }));
  });
}

async function main() {
  const out = { pid: process.pid, connect_ms: [], refused: 0, reset: 0 };
  const slow = await connectOnce(Number(process.env.SLOW_PORT), (s, ms, done) => {
    s.destroy();
    done({ ms });
  });
  out.slow_ms = slow.ms;
  for (let i = 0; i < 20; i++) {
    const r = await connectOnce(Number(process.env.ECHO_PORT), (s, ms, done) => {
      s.once('data', () => {
        s.end();
        s.on('close', () => done({ ms }));
      });
      s.write('ping');
    });
    out.connect_ms.push(r.ms);
  }
  for (let i = 0; i < 5; i++) {
    const r = await connectOnce(Number(process.env.CLOSED_PORT), (s, ms, done) => done({}));
    if (r.error === 'ECONNREFUSED') out.refused++;
  }
  const resetter = net.createServer((s) => s.once('data', () => s.resetAndDestroy()));
  await new Promise((r) => resetter.listen(0, '127.0.0.1', r));
  for (let i = 0; i < 5; i++) {
    const r = await connectOnce(resetter.address().port, (s, ms, done) => s.write('x'));
    if (r.error === 'ECONNRESET') out.reset++;
  }
  resetter.close();
  console.log(JSON.stringify(out));
}
main();
