// A Node.js workload with a known profile: hotA and hotB run the same loop
// body, 7 and 3 times n times, so they take 70% and 30% of the JS time.
// Run with: node --perf-basic-prof --interpreted-frames-native-stack
//           --allow-natives-syntax busy.js SECONDS
'use strict';

function hotA(n) {
  let s = 0;
  for (let i = 0; i < 7 * n; i++) s += Math.sqrt(i) * 1.0001;
  return s;
}

function hotB(n) {
  let s = 0;
  for (let i = 0; i < 3 * n; i++) s += Math.sqrt(i) * 1.0001;
  return s;
}

function driver(seconds) {
  const end = Date.now() + seconds * 1000;
  let sink = 0;
  while (Date.now() < end) {
    sink += hotA(20000);
    sink += hotB(20000);
  }
  return sink;
}

// Keep the driver out of the optimizing compiler, so hotA and hotB are
// never inlined into it: each keeps a frame of its own.
%NeverOptimizeFunction(driver);
console.log(driver(Number(process.argv[2] || 3)) > 0 ? 'done' : 'odd');
