"""A script that leaves its offline LLM open ends as Python scripts do: at its last line, or
with its exception's traceback, and its stage processes end with it. The timeout only stops
a hung interpreter; nothing here measures time."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

HANG_S = 120
SCRIPT = textwrap.dedent("""
    import sys
    from asyncpp import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype="float32",
                  pipeline_parallel_size=int(sys.argv[2]))
        out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2))
        print("generated", len(out[0].outputs[0].token_ids))
        if sys.argv[3] == "raise":
            raise RuntimeError("the user's own error")
""")


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("ending", ["last line", "raise"])
def test_script_exits_without_shutdown(llama_dir, tmp_path, pp, ending):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(llama_dir), str(pp), ending], cwd=tmp_path,
                          capture_output=True, text=True, timeout=HANG_S)
    assert "generated 2" in proc.stdout, proc.stderr
    if ending == "raise":
        assert proc.returncode == 1 and "RuntimeError: the user's own error" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
