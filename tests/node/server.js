// A real Express service for the profiler's tests: renders Markdown with
// marked on every request (CPU-heavy JS: regular expressions, string
// building), as a documentation or blog backend would. Prints its port
// on stdout once listening.
'use strict';
const express = require('express');
const { marked } = require('marked');

const para = (i) =>
  `Paragraph ${i} with *emphasis*, **strong text**, \`inline code\` and a ` +
  `[link](https://example.com/${i}) to somewhere; also a list:\n\n` +
  `- item one of ${i}\n- item _two_ of ${i}\n- item three\n\n` +
  '```js\nconst x = ' + i + ';\nconsole.log(x * 2);\n```\n\n' +
  `> a quote in section ${i}, with a footnote-like [^${i}] mark\n\n`;
const doc = (n) =>
  `# Document ${n}\n\n` + Array.from({ length: 12 }, (_, i) => `## Section ${i}\n\n` + para(i)).join('');

const app = express();
app.get('/health', (req, res) => res.send('ok'));
app.get('/docs/:id', (req, res) => {
  const n = Number(req.params.id) || 0;
  res.type('html').send(marked.parse(doc(n)));
});
const server = app.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  console.log(server.address().port);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
