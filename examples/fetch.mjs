// Kling through kling-gateway with fetch (Node 18+): submit one of the upstream page's examples, poll to the end.
//
//   KLING_GATEWAY_URL=http://127.0.0.1:8080 KLING_GATEWAY_KEY=gk_... node examples/fetch.mjs [text|image|first_last]
//
// Prints the task id, then the final status (and the video URL when completed). Exit 0 completed, 1 otherwise.
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

const BODIES = {
  text: {
    model: "kling-v3-std-silent",
    prompt:
      "A wide cinematic shot of a traveler walking through dusty desert ruins, cloak moving in the wind, slow pullback, natural motion.",
    aspect_ratio: "16:9",
    duration: 5,
    extra_body: { cfg_scale: 0.5, shot_type: "customize", negative_prompt: "blur, low detail" },
  },
  image: {
    model: "kling-v3-pro-audio",
    prompt:
      "The person writes naturally in a notebook, subtle hand detail, small thoughtful pauses, soft classroom depth of field.",
    image: "https://example.com/start-frame.png",
    aspect_ratio: "16:9",
    duration: 6,
    extra_body: { cfg_scale: 0.6, shot_type: "intelligent", negative_prompt: "artifacts, distortion" },
  },
  first_last: {
    model: "kling-v3-pro-silent",
    prompt: "The portrait subject slowly turns toward the camera while keeping identity stable and motion natural.",
    image: "https://example.com/first-frame.png",
    last_image: "https://example.com/last-frame.png",
    duration: 8,
  },
};

const mode = process.argv[2] ?? "text";
const base = (process.env.KLING_GATEWAY_URL ?? "").replace(/\/$/, "");
const key = process.env.KLING_GATEWAY_KEY;
const intervalMs = 1000 * Number(process.env.KLING_POLL_INTERVAL_S ?? "2");
if (!base || !key || !(mode in BODIES)) {
  console.error("set KLING_GATEWAY_URL and KLING_GATEWAY_KEY; usage: node fetch.mjs [text|image|first_last]");
  process.exit(2);
}
const auth = { Authorization: `Bearer ${key}` };

// The gateway's JSON error: a message, a stable code, and every problem of an invalid request.
async function showError(response) {
  const text = await response.text();
  let error;
  try {
    error = JSON.parse(text).error;
  } catch {
    console.error(`HTTP ${response.status}: ${text}`);
    return;
  }
  console.error(`HTTP ${response.status} ${error.code}: ${error.message}`);
  for (const problem of error.errors ?? []) console.error(`  ${problem.param}: ${problem.message} [${problem.code}]`);
}

// The same Idempotency-Key on a retry returns the first answer instead of making a second video.
let response = await fetch(`${base}/v1/video/generations`, {
  method: "POST",
  headers: { ...auth, "Content-Type": "application/json", "Idempotency-Key": randomUUID() },
  body: JSON.stringify(BODIES[mode]),
});
if (!response.ok) {
  await showError(response);
  process.exit(1);
}
let task = await response.json();
const taskId = task.task_id;
console.log(`task_id: ${taskId}`);

while (task.status !== "completed" && task.status !== "failed") {
  await sleep(intervalMs);
  response = await fetch(`${base}/v1/videos/${taskId}`, { headers: auth });
  if (response.status === 429 || response.status === 503) {
    // busy: wait as long as the gateway asks, then poll again
    await sleep(1000 * Number(response.headers.get("retry-after") ?? intervalMs / 1000));
    continue;
  }
  if (!response.ok) {
    await showError(response);
    process.exit(1);
  }
  task = await response.json();
  console.error(`  ${task.status} ${task.progress ?? 0}%`);
}

console.log(`status: ${task.status}`);
if (task.status !== "completed") process.exit(1);
console.log(`video_url: ${task.video_url}`);
