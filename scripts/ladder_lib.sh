# Shared by the post-training ladder scripts: settings and the evaluation every rung gets.
K=.venv/bin/krea2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
eval_world() {  # checkpoint, report [extra eval options]: skipped when the report exists (resumable)
  [ -f "$2" ] || $K eval world --checkpoint "$1" --prompts world_eval --images-per-prompt 2 --out "$2" "${@:3}"
}
