#!/bin/sh
# `llamagate` as the images run it: their ENTRYPOINT, and first on their PATH, so that
# `docker exec CONTAINER llamagate keys ...` goes the same way as `docker run IMAGE serve`.
#
# Run as root (the images' default user, and docker exec's): make DATA_DIR the service
# user's, then run the command as uid/gid 10001 without capabilities, as the official postgres
# and redis images do. A volume the platform mounts owned by root (/workspace,
# /runpod-volume) then just works, and nothing the service or a `keys` command writes there
# is root's, which the service (uid 10001) could not read. Run as any other user
# (`docker run --user`, Kubernetes' runAsUser) it runs the command as that user and changes
# nothing.
#
# As PID 1 it puts tini in front: tini forwards SIGTERM to `llamagate serve` (which drains
# the gateway, then stops llama-server and the health process) and reaps orphaned
# processes, which a Python PID 1 would leave as zombies. Under `docker run --init` the
# runtime's init is PID 1 and does both.
set -eu

app=/opt/venv/bin/llamagate
uid=10001
gid=10001

if [ "$$" = 1 ]; then
  set -- tini -- "$app" "$@"
else
  set -- "$app" "$@"
fi
if [ "$(id -u)" != 0 ]; then
  exec "$@"
fi

if [ -n "${DATA_DIR:-}" ]; then
  # Only what is not the service user's already, so a restart touches nothing; -h changes a
  # link itself, never the file it points to. A read-only volume is reported and left as it
  # is: the service then says what it cannot write.
  if ! { mkdir -p "$DATA_DIR" && find "$DATA_DIR" ! -user "$uid" -exec chown -h "$uid:$gid" {} +; }; then
    echo "llamagate: could not give DATA_DIR=$DATA_DIR to uid $uid; starting anyway" >&2
  fi
fi
# setpriv (util-linux, in every Debian and Ubuntu image) rather than gosu: nothing to add.
# Leaving uid 0 clears the permitted and effective capabilities, --inh-caps the inheritable
# ones; --no-new-privs keeps a setuid program in the image from regaining any.
export HOME=/home/llamagate  # root's /root is not the service user's (caches, ~/.cache/huggingface)
exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all --no-new-privs -- "$@"
