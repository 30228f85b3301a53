# Learning-rate selection (spielbench.tuning): for every tuned target (a method at a rank whose run entries
# give no learning_rate) one short training run per point of its grid (config tuning.grids, the same number
# of points and tuning.max_steps steps for every method), scored on the validation split; then
# results/tuning/chosen_lr.json (with the table and the figure of every grid point), which the final runs'
# run_config rule reads. The run ids of the final runs do not depend on the chosen values, so the DAG is
# known at parse time: no checkpoint is needed, chosen_lr.json is an ordinary input.
# The grids and the tuned runs were checked at parse time (spielbench.pipeline: PIPE.tuned, PIPE.tune_targets).
import spielbench.tuning
from spielbench.aggregate.tuning import TUNING_FILES
from spielbench.tuning import apply_chosen, grid_points

TUNING = config.get("tuning") or {}
TUNE_DIR = f"{RUNS_DIR}/tune"
TUNING_RESULTS = f"{RESULTS}/tuning"
CHOSEN_LR = f"{TUNING_RESULTS}/chosen_lr.json"
VALIDATION_FILE = PIPE.validation_file
TUNED_RUNS = PIPE.tuned              # run id -> target, for the final runs that train at a chosen learning rate
TUNE_POINTS = grid_points(PIPE.tune_targets, TUNING.get("grids") or {}, max_steps=TUNING.get("max_steps", 20),
                          validation_file=VALIDATION_FILE,
                          validation_examples=TUNING.get("validation_examples")) if TUNED_RUNS else {}
TUNE_SCORES = [f"{TUNE_DIR}/{p}/score.json" for p in TUNE_POINTS]
# the grid points' scores are targets too, so deleting one reruns that point and the selection
TUNING_OUTPUTS = ([f"{TUNING_RESULTS}/{name}" for name in TUNING_FILES] + TUNE_SCORES) if TUNE_POINTS else []
TUNE_PATTERN = "|".join(re.escape(p) for p in TUNE_POINTS) or "^$"


localrules:
    tune_run_config,


rule tune_run_config:
    output:
        f"{TUNE_DIR}/{{point}}/run.yaml",
    params:
        run=lambda wc: TUNE_POINTS[wc.point],
    wildcard_constraints:
        point=TUNE_PATTERN,
    log:
        f"{LOGS}/tune/{{point}}.config.log",
    run:
        write_yaml_atomic(output[0], params.run)


rule tune_point:
    input:
        run_config=f"{TUNE_DIR}/{{point}}/run.yaml",
        preflight=ancient(f"{RUNS_DIR}/.preflight.json"),  # train.smk: the checks against a model built by a job
        model=MODEL_DIR,
        train=TRAIN_FILE,
        validation=VALIDATION_FILE or [],
    output:
        score=f"{TUNE_DIR}/{{point}}/score.json",
    params:
        outdir=lambda wc: f"{TUNE_DIR}/{wc.point}",
    wildcard_constraints:
        point=TUNE_PATTERN,
    log:
        f"{LOGS}/tune/{{point}}.log",
    benchmark:
        f"{LOGS}/tune/{{point}}.benchmark.tsv"
    threads: GPU_JOB_THREADS
    resources:
        gpu=1,
        mem_mb=8000,
    shell:
        "OMP_NUM_THREADS={threads} {GPU_SLOT} {resources.gpu} -- {PYTHON:q} -m spielbench.tuning point {input.run_config:q} "
        "--output-dir {params.outdir:q} --score {output.score:q} > {log:q} 2>&1"


# chosen_lr.json depends on the scores only: the final runs read it, so a change of the table or figure code
# must not rewrite it (that would retrain every tuned final run). After changing the selection rule itself
# (spielbench.tuning.select_learning_rate), rerun it with --forcerun tune_select.
rule tune_select:
    input:
        scores=TUNE_SCORES,
    output:
        CHOSEN_LR if TUNE_POINTS else [],
    log:
        f"{LOGS}/tune/select.log",
    shell:
        "{PYTHON:q} -m spielbench.tuning select {input.scores:q} --out-dir {TUNING_RESULTS:q} > {log:q} 2>&1"


rule tune_report:
    input:
        chosen=CHOSEN_LR,
        code=os.path.relpath(os.path.join(os.path.dirname(spielbench.tuning.__file__), "aggregate", "tuning.py")),
    output:
        [f"{TUNING_RESULTS}/{name}" for name in TUNING_FILES[1:]] if TUNE_POINTS else [],
    log:
        f"{LOGS}/tune/report.log",
    shell:
        "{PYTHON:q} -m spielbench.tuning report {input.chosen:q} --out-dir {TUNING_RESULTS:q} > {log:q} 2>&1"
