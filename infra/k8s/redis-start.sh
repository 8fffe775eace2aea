#!/bin/sh
# Start redis-server (docker compose and Kubernetes) with the password from the environment
# (AEGAEON_REDIS_PASSWORD, from .env or a secret) written to a private config file rather than
# the command line, and with the commands that let a client load code or write files as the
# server (CONFIG, MODULE, …) renamed away: the same settings `aegaeon up` gives its own Redis
# (aegaeon/servers.py, REDIS_DISABLED_COMMANDS).
# With AEGAEON_REDIS_REPLICA_OF=host:port it is a read-only replica of that server, which it
# authenticates to with the same password (Kubernetes' redis-replica, redis.yaml). The config
# file's `replicaof` works although the REPLICAOF command is renamed away: no client can point
# a server elsewhere.
set -eu
: "${AEGAEON_REDIS_PASSWORD:?AEGAEON_REDIS_PASSWORD is required}"
conf="$(mktemp -d)/redis.conf"
umask 077
{
  echo 'save ""'
  echo 'appendonly no'
  printf 'requirepass "%s"\n' "$AEGAEON_REDIS_PASSWORD"
  for command in CONFIG MODULE DEBUG SLAVEOF REPLICAOF MIGRATE; do
    echo "rename-command $command \"\""
  done
  if [ -n "${AEGAEON_REDIS_REPLICA_OF:-}" ]; then
    printf 'replicaof %s %s\n' "${AEGAEON_REDIS_REPLICA_OF%:*}" "${AEGAEON_REDIS_REPLICA_OF##*:}"
    printf 'masterauth "%s"\n' "$AEGAEON_REDIS_PASSWORD"
    echo 'replica-read-only yes'
  fi
} > "$conf"
exec redis-server "$conf"
