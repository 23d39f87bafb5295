// An HTTPS server and its client, for the TLS test:
//   node tls.js serve KEY CERT   serves 200 "secure" to every request;
//                                prints its port
//   node tls.js get PORT COUNT   COUNT GETs one after another over one
//                                kept connection; prints {"pid", "ok"}
'use strict';
const fs = require('fs');
const https = require('https');

const [mode, a, b] = process.argv.slice(2);
if (mode === 'serve') {
  const server = https.createServer(
    { key: fs.readFileSync(a), cert: fs.readFileSync(b) },
    (req, res) => res.end('secure\n'),
  );
  server.listen(0, '127.0.0.1', () => console.log(server.address().port));
} else {
  const agent = new https.Agent({ keepAlive: true, maxSockets: 1 });
  const total = Number(b);
  let ok = 0;
  const one = (i) => {
    if (i === total) {
      agent.destroy();
      console.log(JSON.stringify({ pid: process.pid, ok }));
      return;
    }
    https.get({ host: '127.0.0.1', port: Number(a), path: `/orders/${i}`, agent, rejectUnauthorized: false }, (res) => {
      if (res.statusCode === 200) ok++;
      res.resume();
      res.on('end', () => one(i + 1));
    });
  };
  one(0);
}
