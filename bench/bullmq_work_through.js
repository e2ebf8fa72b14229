// BullMQ end to end in a closed loop, the peer of bench/pipeline_bench.py's work-through (run by bench/_peers.py).
// OUTSTANDING jobs are added-but-not-completed at all times: a Worker (the shared harness's worker.js, forked, no-op
// processor, CONCURRENCY) completes them; the producer sees each completion through QueueEvents (the Redis events
// stream, as Conveyor's bench sees its tasks through a WatchTasks stream) and adds one job per completion. A top-up
// every 250 ms re-adds what the counts say is missing (an events-stream entry trimmed before it was read).
// Usage: node bullmq_work_through.js WARMUP_S WINDOW_S OUTSTANDING CONCURRENCY
// Env: REDIS_PORT, BULLMQ_HARNESS (the harness directory: bullmq is required from its node_modules), WATCHDOG_S.
// Prints JSON lines on stdout: window_start / window_end (with worker_pid) and a final result line.
'use strict';
const path = require('path');
const { fork } = require('child_process');
const { performance } = require('perf_hooks');

const HARNESS = process.env.BULLMQ_HARNESS;
const { Queue, QueueEvents } = require(path.join(HARNESS, 'node_modules', 'bullmq'));
const PORT = Number(process.env.REDIS_PORT || 56379);
const [WARMUP_S, WINDOW_S, OUTSTANDING, CONC] = process.argv.slice(2).map(Number);
const connection = { host: '127.0.0.1', port: PORT };
const now = () => performance.now();
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const watchdog = setTimeout(() => { console.error('WATCHDOG: exceeded time bound'); process.exit(2); },
  1000 * Number(process.env.WATCHDOG_S || 240));

async function main() {
  const qname = `work-through-${process.pid}-${Date.now()}`;
  const queue = new Queue(qname, { connection });
  await queue.waitUntilReady();
  const events = new QueueEvents(qname, { connection });
  await events.waitUntilReady();

  // The harness's worker: expected = a count never reached, so it runs until told to stop.
  const worker = fork(path.join(HARNESS, 'worker.js'), [qname, String(CONC), '1000000000000', String(PORT)]);
  const message = (type) => new Promise((resolve) => worker.on('message', (m) => { if (m.type === type) resolve(m); }));
  const ready = message('ready');
  const done = message('done');
  await ready;

  let adding = true, inflightAdds = 0, added = 0, addErrors = 0, completed = 0, inWindow = 0, toppedUp = 0;
  const addOne = () => {
    inflightAdds++;
    queue.add('noop', { i: added++ })
      .catch(() => { addErrors++; })
      .finally(() => { inflightAdds--; });
  };
  events.on('completed', () => {
    completed++;
    if (inWindowFlag) inWindow++;
    if (adding) addOne();
  });
  let inWindowFlag = false;

  const started = message('started');
  worker.send({ type: 'start' });
  await started;
  for (let i = 0; i < OUTSTANDING; i++) addOne();
  const topUp = setInterval(async () => {
    if (!adding) return;
    const counts = await queue.getJobCounts('wait', 'active', 'delayed', 'prioritized', 'paused');
    const have = Object.values(counts).reduce((a, b) => a + b, 0) + inflightAdds;
    if (have >= OUTSTANDING * 0.98) return;  // a job between two states may be counted in neither
    for (let i = have; i < OUTSTANDING; i++) { toppedUp++; addOne(); }
  }, 250);

  await new Promise((r) => setTimeout(r, WARMUP_S * 1000));
  emit({ event: 'window_start', worker_pid: worker.pid });
  const t0 = now();
  inWindowFlag = true;
  await new Promise((r) => setTimeout(r, WINDOW_S * 1000));
  inWindowFlag = false;
  const elapsed = (now() - t0) / 1000;
  const count = inWindow;
  emit({ event: 'window_end', worker_pid: worker.pid });

  adding = false;
  clearInterval(topUp);
  worker.send({ type: 'stop' });
  await done;
  await events.close();
  await queue.close();
  const bullmq = require(path.join(HARNESS, 'node_modules', 'bullmq', 'package.json')).version;
  emit({
    event: 'result', bullmq, outstanding: OUTSTANDING, concurrency: CONC, window_s: Math.round(elapsed * 100) / 100,
    completed_in_window: count, jobs_per_s: Math.round((count / elapsed) * 10) / 10,
    added, add_errors: addErrors, completed_total: completed, topped_up: toppedUp,
  });
  clearTimeout(watchdog);
  process.exit(0);
}
main().catch((e) => { console.error(e); process.exit(1); });
