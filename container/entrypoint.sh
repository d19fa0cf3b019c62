#!/bin/sh
# The runner image's entry point: everything it is given goes to the cloudexec runner.
#
# Providers send a whole command line, `python -m cloudexec.runner <job-url> [--array]`:
# AWS Batch's job command replaces the image's CMD, and Azure Batch hands a container
# task's command line to the ENTRYPOINT as arguments. A command that names a program
# (python, the runner script, a shell for debugging) therefore runs as it is; anything
# else (nothing, --help, a bare job URL) is passed to the runner.
set -e
case "${1:-}" in
    python | python3 | python3.* | */python | */python3 | */python3.* | cloudexec-runner | sh | bash)
        exec "$@"
        ;;
esac
exec python -m cloudexec.runner "$@"
