// A TCP server that answers every chunk it reads with the same bytes: the
// downstream of the RED tests. Prints its port, then serves until killed.
'use strict';
const net = require('net');

const server = net.createServer((s) => s.on('data', (d) => s.write(d)));
server.listen(0, '127.0.0.1', () => console.log(server.address().port));
