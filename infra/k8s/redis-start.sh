#!/bin/sh
# Start redis-server (docker compose and Kubernetes) with the password from the environment
# (AEGAEON_REDIS_PASSWORD, from .env or a secret) written to a private config file rather than
# the command line, and with the commands that let a client load code or write files as the
# server (CONFIG, MODULE, …) renamed away: the same settings `aegaeon up` gives its own Redis
# (aegaeon/servers.py, REDIS_DISABLED_COMMANDS).
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
} > "$conf"
exec redis-server "$conf"
