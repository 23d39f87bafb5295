// A TCP server that answers every chunk it reads with the same bytes: the
// downstream of the RED tests; with $DELAY_MS, each answer that much later
// (one at a time per connection, like a database busy on a query). Prints
// its port, then serves until killed.
'use strict';
const net = require('net');

const delay = Number(process.env.DELAY_MS || 0);
const server = net.createServer((s) => s.on('data', (d) => {
  if (delay > 0) setTimeout(() => s.write(d), delay);
  else s.write(d);
}));
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
