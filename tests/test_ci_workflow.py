"""The example CI workflow (.github/workflows/edgepipe.yml) against the real CLI, without running a build.

The workflow is YAML the project's own CI never runs, so nothing else would notice when it drifts from the
code: a renamed flag, a removed target, an exit code it maps that the CLI no longer returns (or one it
returns that the workflow does not map). Every `python -m pipeline ...` line of every `run:` block is parsed
with the CLI's own argparse parser, once per matrix value.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import glob
import io
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")  # PyYAML: installed with transformers

from pipeline import errors  # noqa: E402
from pipeline.cli import _build_parser  # noqa: E402
from pipeline.targets import available_targets, resolve_target  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "edgepipe.yml"

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
PIPELINE_CALL = re.compile(r"(?<![\w./-])python3?\s+-m\s+pipeline(?![\w.])")
HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?[^\n]*\n(.*?)^\s*\1\s*$", re.S | re.M)
SHELL_OPERATORS = set("();<>|&")


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    assert WORKFLOW.is_file(), f"{WORKFLOW} is missing"
    return yaml.safe_load(WORKFLOW.read_text())


def _on(workflow: dict[str, Any]) -> dict[str, Any]:
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on:` key as True
    return {on: None} if isinstance(on, str) else dict(on or {})


def _targets(workflow: dict[str, Any]) -> list[str]:
    return list(workflow["jobs"]["build"]["strategy"]["matrix"]["target"])


def _steps(workflow: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in workflow["jobs"].items() for step in job.get("steps", [])]


def _uses(workflow: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for _, step in _steps(workflow) if str(step.get("uses", "")).split("@")[0] == action]


def _expand(text: str, workflow: dict[str, Any], target: str) -> str:
    """${{ matrix.target }} and ${{ env.NAME }} replaced by their values, any other expression by a marker
    (`@@steps.build.outputs.code@@`) that an edgepipe command must not contain (see `_known_values`)."""
    env = {key: str(value) for key, value in (workflow.get("env") or {}).items()}

    def value(match: re.Match) -> str:
        expression = match.group(1)
        if expression == "matrix.target":
            return target
        if expression.startswith("env.") and expression[4:] in env:
            return env[expression[4:]]
        return "@@" + re.sub(r"\s+", "_", expression) + "@@"

    return EXPRESSION.sub(value, text)


def _known_values(args: list[str]) -> list[str]:
    unknown = [arg for arg in args if "@@" in arg]
    assert not unknown, f"`python -m pipeline {shlex.join(args)}` uses expressions this test cannot give a value: {unknown}"
    return args


def _without_heredocs(script: str) -> str:
    return HEREDOC.sub("", script)


def pipeline_commands(script: str) -> list[list[str]]:
    """The argument lists (after `python -m pipeline`) of every edgepipe call in a shell script."""
    joined = re.sub(r"\\\n", " ", _without_heredocs(script))
    commands = []
    for line in joined.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in PIPELINE_CALL.finditer(line):
            lexer = shlex.shlex(line[match.start():], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = []
            for token in lexer:
                if token == "#" or set(token) <= SHELL_OPERATORS:  # a comment, or `>`, `||`, `&`, `;`, `)`: the command ends
                    break
                tokens.append(token)
            assert tokens[1:3] == ["-m", "pipeline"], tokens
            commands.append(tokens[3:])
    return commands


def parse_command(args: list[str]):
    """The CLI's namespace for these arguments; AssertionError with argparse's message when the CLI rejects them."""
    parser, message = _build_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            namespace = parser.parse_args(args)
    except SystemExit as exit:
        raise AssertionError(f"`python -m pipeline {shlex.join(args)}` is not a command the CLI accepts "
                             f"(exit {exit.code}): {message.getvalue().strip()}") from None
    # argparse also takes a prefix of a flag (`--cache` for a `--cache-dir`): the workflow must spell each flag out.
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    flags = {flag for action in commands.choices[args[0]]._actions for flag in action.option_strings}
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, f"`python -m pipeline {shlex.join(args)}`: {arg} is not a flag of `{args[0]}` " \
                                               f"(argparse took it as an abbreviation)"
    return namespace


def workflow_commands(workflow: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(job, matrix value, arguments) for every edgepipe call in every run block, once per matrix value."""
    found = []
    for job, step in _steps(workflow):
        if "run" in step:
            for target in _targets(workflow):
                for args in pipeline_commands(_expand(step["run"], workflow, target)):
                    found.append((job, target, _known_values(args)))
    return found


def _build_calls(workflow: dict[str, Any]) -> dict[str, Any]:
    """The parsed build command per matrix value (exactly one each)."""
    calls: dict[str, Any] = {}
    for _, target, args in workflow_commands(workflow):
        namespace = parse_command(args)
        if namespace.command == "build":
            assert target not in calls, f"more than one build command for {target}"
            calls[target] = namespace
    assert sorted(calls) == sorted(_targets(workflow)), "every matrix job runs one `python -m pipeline build`"
    return calls


def cli_exit_codes() -> set[int]:
    """What `python -m pipeline` can exit with: 0, each PipelineError's exit_code, 128 + SIGINT / SIGTERM."""
    codes = {0, 128 + signal.SIGINT, 128 + signal.SIGTERM}
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.PipelineError):
            codes.add(value.exit_code)
    return codes


def mapped_exit_codes(script: str) -> dict[int, str]:
    """The case arms of the result step: code -> the arm's text (`3) echo "::error ..."; exit 3 ;;`)."""
    arms: dict[int, str] = {}
    for pattern, body in re.findall(r"^\s*([0-9]+(?:\|[0-9]+)*)\)(.*)$", script, re.M):
        for code in pattern.split("|"):
            arms.setdefault(int(code), body)
    return arms


def _result_step(workflow: dict[str, Any]) -> dict[str, Any]:
    steps = [step for step in workflow["jobs"]["build"]["steps"] if step.get("name") == "Result"]
    assert len(steps) == 1, "the build job ends with one step named Result that maps the exit codes"
    return steps[0]


# ------------------------------------------------------------------ the tests


def test_an_example_the_project_ci_does_not_run(workflow):
    text = WORKFLOW.read_text()
    assert text.startswith("#") and "To adopt it" in text, "a header comment says how to adopt the workflow"
    assert set(_on(workflow)) == {"workflow_dispatch"}, "only run by hand here; push / pull_request stay commented out"
    assert re.search(r"^\s*#\s+push:", text, re.M) and re.search(r"^\s*#\s+pull_request:", text, re.M)


def test_the_matrix_targets_are_the_cli_targets(workflow):
    targets = _targets(workflow)
    known = available_targets()
    assert targets and len(set(targets)) == len(targets)
    for target in targets:
        assert target in known, f"matrix target {target!r} is not one of {sorted(known)} (pipeline/resources/targets)"
        assert resolve_target(target).name == target, "the matrix names targets by name, not alias: the artifact names follow it"
    assert workflow["jobs"]["build"]["strategy"].get("fail-fast") is False, "one target's failed gate does not cancel the others"


def test_every_edgepipe_command_parses_with_the_cli():
    commands = workflow_commands(yaml.safe_load(WORKFLOW.read_text()))
    assert {args[0] for _, _, args in commands} >= {"build", "verify"}
    for job, target, args in commands:
        parse_command(args)  # AssertionError naming the command when the CLI does not know it


def test_the_build_command(workflow):
    for target, namespace in _build_calls(workflow).items():
        assert namespace.target == target and resolve_target(namespace.target).name == target
        assert namespace.out == Path("out") / target, "each job builds into out/<target>, the directory it uploads"
        assert getattr(namespace, "cache", None) is not None, "the build keeps its stage cache in the --cache directory"
        assert namespace.json, "--json keeps the summary (stdout) apart from the progress (stderr)"


def test_the_command_check_fails_on_what_the_cli_does_not_know():
    script = ("python -m pipeline build --target cpu \\\n  --no-such-flag || code=$?\n"
              "python -m pipeline biuld --target cpu\n"
              "# python -m pipeline in a comment is not a command\n")
    commands = pipeline_commands(script)
    assert commands == [["build", "--target", "cpu", "--no-such-flag"], ["biuld", "--target", "cpu"]]
    with pytest.raises(AssertionError, match="abbreviation"):
        parse_command(["build", "--target", "cpu", "--requ"])  # argparse alone accepts it as --require-engine
    for args in commands:
        with pytest.raises(AssertionError, match="not a command the CLI accepts"):
            parse_command(args)
    (args,) = pipeline_commands(_expand("python -m pipeline build --target ${{ inputs.target }}", {}, "cpu"))
    with pytest.raises(AssertionError, match="cannot give a value"):
        _known_values(args)
    assert mapped_exit_codes("case $c in\n  3) echo x ;;\n  5|6) echo y ;;\nesac") == {3: " echo x ;;", 5: " echo y ;;", 6: " echo y ;;"}


def test_the_stage_cache_is_kept_between_runs(workflow):
    cache_dirs = {str(namespace.cache) for namespace in _build_calls(workflow).values()}
    assert len(cache_dirs) == 1
    (cache_dir,) = cache_dirs
    restore, save = _uses(workflow, "actions/cache/restore"), _uses(workflow, "actions/cache/save")
    assert len(restore) == 1 and len(save) == 1, "the stage cache is restored before the build and saved after it"
    (restore,), (save,) = restore, save
    assert restore["with"]["path"].strip() == cache_dir and save["with"]["path"].strip() == cache_dir, \
        f"actions/cache keeps {cache_dir}, the directory the build's --cache names"
    key = restore["with"]["key"]
    hashed = re.search(r"hashFiles\((.*?)\)", key)
    assert hashed, "the key hashes what the stage keys hash"
    patterns = re.findall(r"'([^']+)'", hashed.group(1))
    assert {"pyproject.toml", "pipeline/**/*.py", "pipeline/resources/**"} <= set(patterns)
    for pattern in patterns:
        assert glob.glob(str(ROOT / pattern), recursive=True), f"hashFiles('{pattern}') matches no file of the repository"
    restore_keys = [line.strip() for line in restore["with"]["restore-keys"].splitlines() if line.strip()]
    assert restore_keys and all(key.startswith(prefix) for prefix in restore_keys), "each restore key is a prefix of the key"
    assert "${{ matrix.target }}" in key, "each target saves its own entry: parallel jobs do not race for one key"
    assert save["with"]["key"].strip() == f"${{{{ steps.{restore['id']}.outputs.cache-primary-key }}}}"
    assert "always()" in save["if"], "the cache is saved when a gate fails or the run is cancelled too"


def test_the_build_is_uploaded_whatever_its_outcome(workflow):
    uploads = [step for step in _uses(workflow, "actions/upload-artifact") if "matrix.target" in step["with"]["name"]]
    assert len(uploads) == 1
    (upload,) = uploads
    assert upload.get("if") == "always()"
    for target, namespace in _build_calls(workflow).items():
        assert _expand(upload["with"]["path"], workflow, target).strip() == str(namespace.out), \
            "the artifact is the build's out directory: manifest.json, report.md, report.html, bundle/"
    (download,) = _uses(workflow, "actions/download-artifact")
    for target in _targets(workflow):
        assert fnmatch.fnmatch(_expand(upload["with"]["name"], workflow, target), download["with"]["pattern"]), \
            "the fleet job downloads every target's artifact"


def test_pip_cache_and_the_readme_install(workflow):
    readme = (ROOT / "README.md").read_text()
    setups = _uses(workflow, "actions/setup-python")
    assert len(setups) == len(workflow["jobs"])
    for setup in setups:
        assert setup["with"]["cache"] == "pip"
        assert "pyproject.toml" in setup["with"]["cache-dependency-path"]
        assert _expand(str(setup["with"]["python-version"]), workflow, "cpu") == "3.11"
    installs = [step["run"].strip() for _, step in _steps(workflow) if "pip install" in step.get("run", "")]
    assert installs and all(install in readme for install in installs), "the install line is the README's"
    assert str(workflow["env"]["HF_HUB_OFFLINE"]) == "1"


def test_actions_are_pinned_to_a_major_version(workflow):
    expected = {"actions/checkout": "v4", "actions/setup-python": "v5", "actions/cache/restore": "v4", "actions/cache/save": "v4",
                "actions/upload-artifact": "v4", "actions/download-artifact": "v4"}
    for _, step in _steps(workflow):
        if "uses" in step:
            action, _, version = step["uses"].partition("@")
            assert expected.get(action) == version, f"{step['uses']}: expected one of {expected}"


def test_the_exit_codes_are_the_job_result(workflow):
    result = _result_step(workflow)
    assert result.get("if") == "always()"
    arms = mapped_exit_codes(result["run"])
    known = cli_exit_codes()
    assert set(arms) <= known, f"the workflow maps codes the CLI never returns: {sorted(set(arms) - known)}"
    assert known <= set(arms), f"exit codes the CLI returns that the workflow does not map: {sorted(known - set(arms))}"
    for code, body in arms.items():
        if code != 0:
            assert "::error" in body and re.search(r"\bexit\b", body), f"exit {code}: an ::error annotation and a failed job"
    assert "manifest" in result["run"] and "failure" in result["run"], "a failed gate is named from manifest.json's failure"
    build = next(step for step in workflow["jobs"]["build"]["steps"] if step.get("id") == "build")
    assert "set +e" in build["run"] and 'code=$code" >> "$GITHUB_OUTPUT"' in build["run"], \
        "the build step records the exit code instead of failing before the uploads"
    assert "steps.build.outputs.code" in result["run"]
    summary = [step for step in workflow["jobs"]["build"]["steps"] if "GITHUB_STEP_SUMMARY" in step.get("run", "")]
    assert summary and all(step.get("if") == "always()" for step in summary) and "report.md" in summary[0]["run"]


def test_steps_refer_to_steps_that_exist(workflow):
    for name, job in workflow["jobs"].items():
        ids = {step["id"] for step in job.get("steps", []) if "id" in step}
        text = yaml.safe_dump(job)
        for referenced in re.findall(r"steps\.([\w-]+)\.outputs", text):
            assert referenced in ids, f"job {name} reads steps.{referenced}, which has no step"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_scripts_are_valid_shell_and_python(workflow):
    for job, step in _steps(workflow):
        if "run" not in step:
            continue
        script = _expand(step["run"], workflow, _targets(workflow)[0])
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, f"{job} / {step.get('name')}: {checked.stderr}"
        for _, body in HEREDOC.findall(script):
            compile(body, f"{job} / {step.get('name')}", "exec")
