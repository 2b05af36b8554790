#!/usr/bin/env bash
# Kling through kling-gateway with curl: submit one of the upstream page's three example requests, poll it to the end.
#
#   KLING_GATEWAY_URL=http://127.0.0.1:8080 KLING_GATEWAY_KEY=gk_... ./examples/curl.sh [text|image|first_last]
#
# Prints the task id, then the final status (and the video URL when completed). Exit 0 completed, 1 otherwise.
set -euo pipefail

: "${KLING_GATEWAY_URL:?set KLING_GATEWAY_URL, e.g. http://127.0.0.1:8080}"
: "${KLING_GATEWAY_KEY:?set KLING_GATEWAY_KEY (kling-gateway serve --sandbox prints a dev key)}"
base="${KLING_GATEWAY_URL%/}"
interval="${KLING_POLL_INTERVAL_S:-2}"

case "${1:-text}" in
  text)
    body='{
    "model": "kling-v3-std-silent",
    "prompt": "A wide cinematic shot of a traveler walking through dusty desert ruins, cloak moving in the wind, slow pullback, natural motion.",
    "aspect_ratio": "16:9",
    "duration": 5,
    "extra_body": {
      "cfg_scale": 0.5,
      "shot_type": "customize",
      "negative_prompt": "blur, low detail"
    }
  }' ;;
  image)
    body='{
    "model": "kling-v3-pro-audio",
    "prompt": "The person writes naturally in a notebook, subtle hand detail, small thoughtful pauses, soft classroom depth of field.",
    "image": "https://example.com/start-frame.png",
    "aspect_ratio": "16:9",
    "duration": 6,
    "extra_body": {
      "cfg_scale": 0.6,
      "shot_type": "intelligent",
      "negative_prompt": "artifacts, distortion"
    }
  }' ;;
  first_last)
    body='{
    "model": "kling-v3-pro-silent",
    "prompt": "The portrait subject slowly turns toward the camera while keeping identity stable and motion natural.",
    "image": "https://example.com/first-frame.png",
    "last_image": "https://example.com/last-frame.png",
    "duration": 8
  }' ;;
  *) echo "usage: $0 [text|image|first_last]" >&2; exit 2 ;;
esac

# The same Idempotency-Key on a retry returns the first answer instead of making a second video.
idempotency_key="$(cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen)"

# field NAME: the string (or number) value of a top-level JSON field of stdin; enough for these flat bodies.
field() { sed -n "s/.*\"$1\" *: *\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n 1; }

if ! response="$(curl -sS --fail-with-body -X POST "$base/v1/video/generations" \
    -H "Authorization: Bearer $KLING_GATEWAY_KEY" \
    -H "Content-Type: application/json" \
    -H "Idempotency-Key: $idempotency_key" \
    -d "$body")"; then
  echo "submission refused: $response" >&2   # the gateway's JSON error: error.message, error.code, error.errors[]
  exit 1
fi
task_id="$(printf '%s' "$response" | field task_id)"
echo "task_id: $task_id"

status="$(printf '%s' "$response" | field status)"
while [ "$status" != "completed" ] && [ "$status" != "failed" ]; do
  sleep "$interval"
  # --retry honours Retry-After when the gateway answers 429/503.
  response="$(curl -sS --fail-with-body --retry 5 "$base/v1/videos/$task_id" \
    -H "Authorization: Bearer $KLING_GATEWAY_KEY")"
  status="$(printf '%s' "$response" | field status)"
  echo "  $status $(printf '%s' "$response" | field progress)%" >&2
done

echo "status: $status"
if [ "$status" = "completed" ]; then
  echo "video_url: $(printf '%s' "$response" | field video_url)"
else
  exit 1
fi
