// A plain `http` server with routes of known latency and known error
// rates, for the RED tests. Prints its port, then serves until killed.
//
//   GET /fast          200 at once
//   GET /slow/:id      200 after 20 ms (and $SLOW_EXTRA_MS more)
//   GET /flaky/:id     500 for every 4th request (per process), else 200
//   GET /fanout/:id    12 round trips, one after the other, on one kept
//                      connection to the TCP echo server on port
//                      $DOWNSTREAM_PORT, then 200
//   GET /pooled/:id    one round trip through a pool of $POOL_SIZE
//                      connections (default 2) to the TCP server on port
//                      $POOL_PORT; a request waits for a free connection
//                      when all are busy; then 200
//   anything else      404
'use strict';
const http = require('http');
const net = require('net');

const FANOUT = 12;
let downstream = null;
if (process.env.DOWNSTREAM_PORT) {
  downstream = net.connect(Number(process.env.DOWNSTREAM_PORT), '127.0.0.1');
  downstream.setNoDelay(true);
}

// One round trip: a write, then the echo.
function roundTrip() {
  return new Promise((resolve) => {
    downstream.once('data', resolve);
    downstream.write('ping');
  });
}

// A connection pool, as database clients keep one: $POOL_SIZE kept
// connections, a queue of requests waiting for one.
const pool = { idle: [], waiting: [] };
if (process.env.POOL_PORT) {
  for (let i = 0; i < Number(process.env.POOL_SIZE || 2); i++) {
    const c = net.connect(Number(process.env.POOL_PORT), '127.0.0.1');
    c.setNoDelay(true);
    pool.idle.push(c);
  }
}
function acquire(use) {
  const c = pool.idle.pop();
  if (c) use(c);
  else pool.waiting.push(use);
}
function release(c) {
  const next = pool.waiting.shift();
  if (next) next(c);
  else pool.idle.push(c);
}
function pooledQuery(done) {
  acquire((c) => {
    c.once('data', () => {
      release(c);
      done();
    });
    c.write('query');
  });
}

let flaky = 0;
const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (path === '/fast') {
    res.end('fast\n');
  } else if (path.startsWith('/slow/')) {
    setTimeout(() => res.end('slow\n'), 20 + Number(process.env.SLOW_EXTRA_MS || 0));
  } else if (path.startsWith('/fanout/') && downstream) {
    (async () => {
      for (let i = 0; i < FANOUT; i++) await roundTrip();
      res.end('fanout\n');
    })();
  } else if (path.startsWith('/pooled/') && process.env.POOL_PORT) {
    pooledQuery(() => res.end('pooled\n'));
  } else if (path.startsWith('/flaky/')) {
    flaky++;
    res.statusCode = flaky % 4 === 0 ? 500 : 200;
    res.end('flaky\n');
  } else {
    res.statusCode = 404;
    res.end('no\n');
  }
});
// Idle keep-alive connections are closed after $KEEPALIVE_MS (default
// 60 s; Node's own default is 5 s).
server.keepAliveTimeout = Number(process.env.KEEPALIVE_MS || 60000);
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
