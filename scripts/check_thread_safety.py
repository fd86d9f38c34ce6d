#!/usr/bin/env python3
"""Clang's thread-safety analysis over core/ and server/ (docs/architecture.md "Threads").

Replays the build's compile_commands.json with clang++ -fsyntax-only -Wthread-safety -Werror for
every translation unit of core/ and server/, so that each GUARDED_BY member is proven to be used
only with its mutex held (core/base/thread_annotations.h). The GCC build is the product; this is a
check, run by `make test` as the ctest `check_thread_safety`.

usage: check_thread_safety.py BUILD_DIR
"""
import concurrent.futures
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

FOLDERS = ("core/", "server/")


def clang_command(entry, clang):
    args = entry.get("arguments") or shlex.split(entry["command"])
    # Drop the launcher (ccache) and the compiler, the output and dependency-file flags.
    while args and not args[0].startswith("-") and not args[0].endswith(("c++", "g++", "clang++")):
        args = args[1:]
    args = args[1:]
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD"):
            continue
        out.append(a)
    return [clang, "-fsyntax-only", "-Wthread-safety", "-Werror"] + out


def main():
    build = pathlib.Path(sys.argv[1]).resolve()
    root = pathlib.Path(__file__).resolve().parent.parent
    clang = shutil.which("clang++")
    if clang is None:
        print("check_thread_safety: clang++ is not installed (scripts/install-deps.sh installs it)")
        return 1
    entries = json.loads((build / "compile_commands.json").read_text())
    jobs = []
    for e in entries:
        rel = os.path.relpath(e["file"], root)
        if rel.startswith(FOLDERS):
            jobs.append((rel, e["directory"], clang_command(e, clang)))
    if not jobs:
        print("check_thread_safety: no translation unit of core/ or server/ in compile_commands.json")
        return 1

    def run(job):
        rel, directory, cmd = job
        p = subprocess.run(cmd, cwd=directory, capture_output=True, text=True)
        return rel, p.returncode, p.stderr

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for rel, code, err in pool.map(run, sorted(jobs)):
            if code != 0:
                failed += 1
                print(f"FAIL {rel}\n{err}")
    print(f"check_thread_safety: {len(jobs)} translation units, {failed} with findings")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
