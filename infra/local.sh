#!/usr/bin/env bash
# Local infrastructure for newsroom without Docker: Apache Kafka (KRaft, single node; a
# three-node cluster on demand),
# Apicurio Registry (Confluent-compatible API), PostgreSQL, Redis and an SMTP server that
# keeps what it receives (infra/smtp_capture.py), all on loopback,
# with their data under .local/ in the project. Idempotent: `up` installs what is
# missing, starts what is not running and waits until each one answers.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${NEWSROOM_STATE_DIR:-$ROOT/.local}"
HOST=127.0.0.1
KAFKA_PORT="${NEWSROOM_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${NEWSROOM_KAFKA_CONTROLLER_PORT:-9093}"
REGISTRY_PORT="${NEWSROOM_REGISTRY_PORT:-8085}"
REGISTRY_MANAGEMENT_PORT="${NEWSROOM_REGISTRY_MANAGEMENT_PORT:-9085}"
PG_PORT="${NEWSROOM_PG_PORT:-5432}"
REDIS_PORT="${NEWSROOM_REDIS_PORT:-6379}"
SMTP_PORT="${NEWSROOM_SMTP_PORT:-2525}"
# The same stores behind TLS (and Kafka behind SASL over TLS), for trying and testing
# newsroom's TLS settings: a PostgreSQL cluster that refuses plain connections, a Redis
# with no plain port, and a SASL_SSL listener of the single broker (port 0: none).
KAFKA_SASL_SSL_PORT="${NEWSROOM_KAFKA_SASL_SSL_PORT:-9094}"
PG_TLS_PORT="${NEWSROOM_PG_TLS_PORT:-5442}"
REDIS_TLS_PORT="${NEWSROOM_REDIS_TLS_PORT:-6380}"
APICURIO_VERSION="${NEWSROOM_APICURIO_VERSION:-3.3.3}"
PG_VERSION="${NEWSROOM_PG_VERSION:-15}"
PG_BIN="/usr/lib/postgresql/$PG_VERSION/bin"

usage() {
  cat <<EOF
Usage: infra/local.sh COMMAND [SERVICE]

Runs newsroom's infrastructure on this machine, bound to $HOST, data in $STATE.

Commands:
  up [SERVICE]      install what is missing, start what is not running, wait until ready
  down [SERVICE]    stop what this script started (data is kept)
  status            list each service, its address and whether it answers
  deps              install the Debian packages and Maven artifacts only
  reset             stop everything and delete $STATE (all data, downloaded jars)
  cluster ACTION    a 3-node Kafka cluster (KRaft, replication 3, min.insync.replicas 2)
                    beside the single broker, data in $STATE/cluster:
                    up | down | status | brokers | start N | stop N | kill N (kill -9) |
                    pause N (SIGSTOP) | resume N | reset
  -h, --help        show this help

Services: postgres, redis, kafka, registry, smtp, tls (default: all, started in that order).
The SMTP server keeps every message it receives in $STATE/smtp/mail/.
tls: a CA and a server certificate for 127.0.0.1 in $STATE/tls/ (ca.pem), a PostgreSQL
cluster that takes TLS connections only, a Redis with a TLS port only, and the single
broker's SASL_SSL listener (PLAIN, user newsroom, password in $STATE/tls/kafka-password).

Environment (defaults in brackets):
  NEWSROOM_KAFKA_PORT [9092]  NEWSROOM_KAFKA_CONTROLLER_PORT [9093]
  NEWSROOM_REGISTRY_PORT [8085]  NEWSROOM_REGISTRY_MANAGEMENT_PORT [9085]
  NEWSROOM_PG_PORT [5432]  NEWSROOM_REDIS_PORT [6379]  NEWSROOM_SMTP_PORT [2525]
  NEWSROOM_STATE_DIR [$ROOT/.local]  NEWSROOM_JAVA21_HOME [first JDK >= 21 found]
  NEWSROOM_CLUSTER_PORT_BASE [9200]: cluster node N serves on BASE+N, its controller on BASE+10+N
  NEWSROOM_KAFKA_SASL_SSL_PORT [9094; 0: no such listener]  NEWSROOM_PG_TLS_PORT [5442]
  NEWSROOM_REDIS_TLS_PORT [6380]
EOF
}

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      die "$name did not become ready within ${secs}s (logs in $STATE/$name/)"
    fi
    sleep 0.5
  done
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- installation -------------------------------------------------------------

APT_UPDATED=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  if ((APT_UPDATED == 0)); then
    $sudo apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

java21_home() {
  if [[ -n ${NEWSROOM_JAVA21_HOME:-} ]]; then
    echo "$NEWSROOM_JAVA21_HOME"
    return
  fi
  local candidate version
  for candidate in ${JAVA_HOME:-} /usr/lib/jvm/*; do
    [[ -x $candidate/bin/java ]] || continue
    version=$("$candidate/bin/java" -XshowSettings:properties -version 2>&1 |
      sed -n 's/^ *java.specification.version = //p')
    if [[ ${version%%.*} =~ ^[0-9]+$ ]] && ((${version%%.*} >= 21)); then
      echo "$candidate"
      return
    fi
  done
  return 1
}

install_deps() {
  apt_install ca-certificates curl maven openjdk-17-jre-headless \
    "postgresql-$PG_VERSION" redis-server pkg-config libssl-dev openssl build-essential kcat \
    python3 python3-aiosmtpd python3-venv
  # The web console's browser test drives Debian's headless Chromium through chromedriver.
  apt_install chromium chromium-driver
  if ! java21_home >/dev/null; then
    # Apicurio Registry 3.x needs Java 21+. Debian 12 ships 17 only; try newer packages.
    apt_install openjdk-21-jre-headless 2>/dev/null || apt_install openjdk-25-jre-headless 2>/dev/null ||
      die "Apicurio Registry needs Java >= 21; set NEWSROOM_JAVA21_HOME to one"
  fi
  install_kafka
  install_registry
  install_fuzzer
}

# schemathesis, the schema-driven fuzzer of tests/tests/fuzz.rs, in a virtualenv of its
# own (Debian's Python).
SCHEMATHESIS_VERSION=4.32.5
install_fuzzer() {
  local dir="$STATE/fuzz" python=/usr/bin/python3
  [[ -f $dir/.complete-$SCHEMATHESIS_VERSION ]] && return 0
  log "installing schemathesis $SCHEMATHESIS_VERSION into $dir/venv ($("$python" --version))"
  rm -rf "$dir" && mkdir -p "$dir"
  # Its dependencies pinned as they were tested (infra/fuzz-constraints.txt). Without
  # PyPI the rest of the infrastructure still comes up; only the fuzz test fails.
  if "$python" -m venv "$dir/venv" >"$dir/pip.log" 2>&1 &&
    "$dir/venv/bin/pip" install -q -c "$ROOT/infra/fuzz-constraints.txt" \
      "schemathesis==$SCHEMATHESIS_VERSION" >>"$dir/pip.log" 2>&1; then
    touch "$dir/.complete-$SCHEMATHESIS_VERSION"
  else
    log "warning: installing schemathesis failed (see $dir/pip.log); the fuzz test will fail"
  fi
}

install_kafka() {
  local lib="$STATE/kafka/lib"
  if [[ -f $lib/.complete ]]; then return 0; fi
  log "resolving Apache Kafka from Maven Central into $lib"
  rm -rf "$lib"
  mkdir -p "$lib"
  mvn -q -B -f "$ROOT/infra/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$lib" >"$STATE/kafka/maven.log" 2>&1 ||
    die "maven could not resolve Kafka (see $STATE/kafka/maven.log)"
  touch "$lib/.complete"
}

install_registry() {
  local dir="$STATE/registry/app"
  if [[ -f $dir/quarkus-run.jar ]]; then return 0; fi
  log "resolving Apicurio Registry $APICURIO_VERSION from Maven Central"
  mkdir -p "$STATE/registry"
  mvn -q -B -f "$ROOT/infra/kafka/pom.xml" dependency:copy -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
    -DoutputDirectory="$STATE/registry" >"$STATE/registry/maven.log" 2>&1 ||
    die "maven could not resolve Apicurio Registry (see $STATE/registry/maven.log)"
  rm -rf "$dir.tmp"
  mkdir -p "$dir.tmp"
  tar -xzf "$STATE/registry/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz" -C "$dir.tmp"
  rm -f "$STATE/registry/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz"
  mv "$dir.tmp" "$dir"
}

# --- PostgreSQL ---------------------------------------------------------------

pg_data() { echo "$STATE/postgres/data"; }

as_pg_owner() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_ready() { "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT"; }

start_postgres() {
  local data
  data=$(pg_data)
  if pg_ready; then log "postgres already answers on $HOST:$PG_PORT"; ensure_pg_roles; return 0; fi
  mkdir -p "$STATE/postgres"
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$STATE/postgres"
    # The server refuses to run as root: the postgres user must reach the data folder.
    as_pg_owner test -x "$STATE/postgres" ||
      die "user postgres cannot reach $STATE/postgres; set NEWSROOM_STATE_DIR to a folder it can"
  fi
  if [[ ! -f $data/PG_VERSION ]]; then
    log "initialising a PostgreSQL cluster in $data"
    as_pg_owner "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  as_pg_owner "$PG_BIN/pg_ctl" -D "$data" -l "$STATE/postgres/postgres.log" -w -t 60 start \
    -o "-c listen_addresses=$HOST -c port=$PG_PORT -c unix_socket_directories=$STATE/postgres -c max_connections=400 -c shared_buffers=256MB -c fsync=on" \
    >/dev/null
  wait_for postgres 60 pg_ready
  ensure_pg_roles
}

ensure_pg_roles() {
  local psql=("$PG_BIN/psql" -q -h "$STATE/postgres" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
  [[ -S $STATE/postgres/.s.PGSQL.$PG_PORT ]] || return 0 # not ours: roles are the owner's business
  as_pg_owner "${psql[@]}" >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'newsroom') THEN
    CREATE ROLE newsroom LOGIN CREATEDB PASSWORD 'newsroom';
  END IF;
END $$;
SQL
  for db in newsroom apicurio; do
    if ! as_pg_owner "${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      as_pg_owner "${psql[@]}" -c "CREATE DATABASE $db OWNER newsroom" >/dev/null
    fi
  done
}

stop_postgres() {
  local data
  data=$(pg_data)
  if [[ -f $data/postmaster.pid ]]; then
    as_pg_owner "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null || true
  fi
}

# --- Redis --------------------------------------------------------------------

redis_ready() { [[ $(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

start_redis() {
  if redis_ready; then log "redis already answers on $HOST:$REDIS_PORT"; return 0; fi
  mkdir -p "$STATE/redis"
  redis-server --bind "$HOST" --port "$REDIS_PORT" --daemonize yes --dir "$STATE/redis" \
    --pidfile "$STATE/redis/redis.pid" --logfile "$STATE/redis/redis.log" \
    --appendonly no --save "300 1" --protected-mode yes
  wait_for redis 30 redis_ready
}

stop_redis() {
  if pid_alive "$STATE/redis/redis.pid"; then
    redis-cli -h "$HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || kill "$(cat "$STATE/redis/redis.pid")"
  fi
}

# --- Kafka --------------------------------------------------------------------

# A Kafka node (broker and controller in one process) lives in a folder of its own:
# server.properties, data/, server.log, kafka.pid.
kafka_node_ready() { port_open "$2" && grep -q "Kafka Server started" "$1/server.log"; }

# write_kafka_config DIR NODE_ID PORT CONTROLLER_PORT VOTERS REPLICATION MIN_ISR [SASL_SSL_PORT]
write_kafka_config() {
  local dir=$1 node=$2 port=$3 controller=$4 voters=$5 rf=$6 isr=$7 sasl_ssl=${8:-}
  local listeners="PLAINTEXT://$HOST:$port" map="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  [[ -z $sasl_ssl ]] || { listeners+=",SASL_SSL://$HOST:$sasl_ssl"; map+=",SASL_SSL:SASL_SSL"; }
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=$node
controller.quorum.voters=$voters
listeners=$listeners,CONTROLLER://$HOST:$controller
advertised.listeners=$listeners
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=$map
log.dirs=$dir/data
num.partitions=3
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=10
# A transaction a dead writer left open is aborted within a second of its timeout.
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.ms=-1
EOF
  if [[ -n $sasl_ssl ]]; then
    cat >>"$dir/server.properties" <<EOF
listener.name.sasl_ssl.sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_newsroom="$(cat "$STATE/tls/kafka-password")";
listener.name.sasl_ssl.ssl.keystore.type=PEM
listener.name.sasl_ssl.ssl.keystore.location=$STATE/tls/server-bundle.pem
EOF
    chmod 600 "$dir/server.properties" # it holds the listener's password
  fi
}

# start_kafka_node NAME DIR PORT HEAP [CLUSTER_ID]: formats the storage once (with
# CLUSTER_ID, or a fresh one), starts the node and waits until it serves.
start_kafka_node() {
  local name=$1 dir=$2 port=$3 heap=$4 cluster_id=${5:-}
  local cp="$STATE/kafka/lib/*"
  local java=(java -Xms128m "-Xmx$heap" -Dlog4j2.configurationFile="$ROOT/infra/kafka/log4j2.properties"
    -Dkafka.logs.dir="$dir" -cp "$cp")
  if [[ ! -f $dir/data/meta.properties ]]; then
    log "formatting Kafka storage in $dir/data"
    [[ -n $cluster_id ]] || cluster_id=$("${java[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    "${java[@]}" kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" \
      -g >"$dir/format.log" 2>&1 || die "kafka storage format failed (see $dir/format.log)"
  fi
  : >"$dir/server.log"
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/server.log" 2>&1 &
  echo $! >"$dir/kafka.pid"
  wait_for "$name" 120 kafka_node_ready "$dir" "$port"
}

kafka_ready() { kafka_node_ready "$STATE/kafka" "$KAFKA_PORT"; }

start_kafka() {
  if pid_alive "$STATE/kafka/kafka.pid" && port_open "$KAFKA_PORT"; then
    if [[ $KAFKA_SASL_SSL_PORT == 0 ]] || grep -q "^listeners=.*SASL_SSL://$HOST:$KAFKA_SASL_SSL_PORT," "$STATE/kafka/server.properties"; then
      log "kafka already answers on $HOST:$KAFKA_PORT"
      return 0
    fi
    # Started by an older version of this script: restarted with the SASL_SSL listener.
    log "kafka has no SASL_SSL listener on $HOST:$KAFKA_SASL_SSL_PORT; restarting it with one"
    stop_kafka
  fi
  port_open "$KAFKA_PORT" && die "port $KAFKA_PORT is taken by a process this script did not start"
  install_kafka
  mkdir -p "$STATE/kafka/data"
  local sasl_ssl=""
  if [[ $KAFKA_SASL_SSL_PORT != 0 ]]; then
    ensure_tls_files
    sasl_ssl=$KAFKA_SASL_SSL_PORT
  fi
  write_kafka_config "$STATE/kafka" 1 "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" \
    "1@$HOST:$KAFKA_CONTROLLER_PORT" 1 1 "$sasl_ssl"
  start_kafka_node kafka "$STATE/kafka" "$KAFKA_PORT" 1g
}

stop_kafka() {
  stop_pidfile "$STATE/kafka/kafka.pid" kafka 60
}

# --- Kafka cluster (three KRaft nodes, for the chaos run) -------------------------

CLUSTER_PORT_BASE="${NEWSROOM_CLUSTER_PORT_BASE:-9200}"
CLUSTER_DIR="$STATE/cluster"
CLUSTER_NODES=(1 2 3)

cluster_port() { echo $((CLUSTER_PORT_BASE + $1)); }
cluster_controller_port() { echo $((CLUSTER_PORT_BASE + 10 + $1)); }
cluster_brokers() {
  local n out=()
  for n in "${CLUSTER_NODES[@]}"; do out+=("$HOST:$(cluster_port "$n")"); done
  (IFS=,; echo "${out[*]}")
}

# cluster_node_start N [nowait]: a node of a fresh cluster serves only once a quorum of
# controllers is up, so `up` starts all three in the background, then waits for them.
cluster_node_start() {
  local n=$1 dir="$CLUSTER_DIR/k$1" port
  port=$(cluster_port "$n")
  if pid_alive "$dir/kafka.pid" && port_open "$port"; then
    # A node paused (SIGSTOP) still accepts connections: let it run again.
    kill -CONT "$(cat "$dir/kafka.pid")" 2>/dev/null || true
    log "cluster node $n already answers on $HOST:$port"
    return 0
  fi
  port_open "$port" && die "port $port is taken by a process this script did not start"
  mkdir -p "$dir/data"
  local voters=() m
  for m in "${CLUSTER_NODES[@]}"; do voters+=("$m@$HOST:$(cluster_controller_port "$m")"); done
  write_kafka_config "$dir" "$n" "$port" "$(cluster_controller_port "$n")" \
    "$(IFS=,; echo "${voters[*]}")" 3 2
  # A broker killed with -9 is fenced and its partitions' leaders move after this long.
  printf 'broker.session.timeout.ms=3000\nbroker.heartbeat.interval.ms=500\n' >>"$dir/server.properties"
  start_kafka_node "cluster node $n" "$dir" "$port" 512m "$(cat "$CLUSTER_DIR/cluster.id")"
}

cmd_cluster() {
  local action=${1:-} n=${2:-} m
  case $action in
    up)
      mkdir -p "$CLUSTER_DIR"
      install_kafka
      [[ -s $CLUSTER_DIR/cluster.id ]] || java -cp "$STATE/kafka/lib/*" kafka.tools.StorageTool \
        random-uuid 2>/dev/null | tail -n 1 >"$CLUSTER_DIR/cluster.id"
      local pids=()
      for m in "${CLUSTER_NODES[@]}"; do
        cluster_node_start "$m" &
        pids+=($!)
      done
      for m in "${pids[@]}"; do wait "$m" || die "a cluster node did not start (logs in $CLUSTER_DIR/k*/)"; done
      log "cluster up: NEWSROOM_KAFKA_BROKERS=$(cluster_brokers) NEWSROOM_TOPIC_REPLICATION=3"
      cmd_cluster status
      ;;
    down)
      for m in "${CLUSTER_NODES[@]}"; do stop_pidfile "$CLUSTER_DIR/k$m/kafka.pid" "cluster node $m" 60; done
      ;;
    start | stop | kill | pause | resume)
      [[ $n =~ ^[123]$ ]] || die "cluster $action needs a node: 1, 2 or 3"
      case $action in
        pause | resume)
          pid_alive "$CLUSTER_DIR/k$n/kafka.pid" || die "cluster node $n is not running"
          if [[ $action == pause ]]; then kill -STOP "$(cat "$CLUSTER_DIR/k$n/kafka.pid")"
          else kill -CONT "$(cat "$CLUSTER_DIR/k$n/kafka.pid")"; fi
          ;;
        start) cluster_node_start "$n" ;;
        stop) stop_pidfile "$CLUSTER_DIR/k$n/kafka.pid" "cluster node $n" 60 ;;
        kill)
          if pid_alive "$CLUSTER_DIR/k$n/kafka.pid"; then kill -9 "$(cat "$CLUSTER_DIR/k$n/kafka.pid")"; fi
          rm -f "$CLUSTER_DIR/k$n/kafka.pid"
          ;;
      esac
      ;;
    brokers) cluster_brokers ;;
    status)
      local ok=0 port
      for m in "${CLUSTER_NODES[@]}"; do
        port=$(cluster_port "$m")
        if port_open "$port"; then printf 'node %s  %s:%s  up\n' "$m" "$HOST" "$port"
        else printf 'node %s  %s:%s  down\n' "$m" "$HOST" "$port"; ok=1; fi
      done
      return $ok
      ;;
    reset)
      cmd_cluster down
      rm -rf "$CLUSTER_DIR"
      log "removed $CLUSTER_DIR"
      ;;
    *) die "cluster needs one of: up, down, status, brokers, start N, stop N, kill N, pause N, resume N, reset" ;;
  esac
}

# stop_pidfile FILE NAME SECONDS: SIGTERM, wait, then SIGKILL.
stop_pidfile() {
  local file=$1 name=$2 secs=$3
  pid_alive "$file" || { rm -f "$file"; return 0; }
  local pid
  pid=$(cat "$file")
  kill "$pid"
  local deadline=$((SECONDS + secs))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "$name did not stop within ${secs}s; killing it"
      kill -9 "$pid" 2>/dev/null || true
    fi
    sleep 0.2
  done
  rm -f "$file"
}

# --- Apicurio Registry --------------------------------------------------------

registry_ready() { curl -fsS "http://$HOST:$REGISTRY_PORT/apis/ccompat/v7/subjects" >/dev/null; }

start_registry() {
  if pid_alive "$STATE/registry/registry.pid" && registry_ready; then
    log "registry already answers on $HOST:$REGISTRY_PORT"
    return 0
  fi
  port_open "$REGISTRY_PORT" && die "port $REGISTRY_PORT is taken by a process this script did not start"
  install_registry
  local jhome
  jhome=$(java21_home) || die "Apicurio Registry needs Java >= 21 (run infra/local.sh deps)"
  # Schemas are stored in PostgreSQL so that the ids inside events survive restarts; pooled
  # connections are checked before use, so that a PostgreSQL restart does not leave the
  # registry failing on dead ones.
  nohup "$jhome/bin/java" -Xms128m -Xmx512m \
    -Dquarkus.http.host="$HOST" -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.management.host="$HOST" -Dquarkus.management.port="$REGISTRY_MANAGEMENT_PORT" \
    -Dapicurio.storage.kind=sql -Dapicurio.storage.sql.kind=postgresql \
    -Dapicurio.datasource.url="jdbc:postgresql://$HOST:$PG_PORT/apicurio" \
    -Dapicurio.datasource.username=newsroom -Dapicurio.datasource.password=newsroom \
    -Dapicurio.datasource.jdbc.initial-size=2 -Dapicurio.datasource.jdbc.min-size=2 \
    -Dapicurio.datasource.jdbc.max-size=20 \
    -Dquarkus.datasource.postgresql.jdbc.validate-on-borrow=true \
    -Dquarkus.datasource.postgresql.jdbc.validation-query-sql="SELECT 1" \
    -Dquarkus.datasource.postgresql.jdbc.background-validation-interval=5S \
    -Dapicurio.rest.deletion.artifact.enabled=true \
    -Dapicurio.rest.deletion.artifact-version.enabled=true \
    -jar "$STATE/registry/app/quarkus-run.jar" >"$STATE/registry/registry.log" 2>&1 &
  echo $! >"$STATE/registry/registry.pid"
  wait_for registry 120 registry_ready
  # Every schema change must stay readable by every older reader and writer.
  curl -fsS -X PUT -H 'Content-Type: application/vnd.schemaregistry.v1+json' \
    --data '{"compatibility":"BACKWARD_TRANSITIVE"}' \
    "http://$HOST:$REGISTRY_PORT/apis/ccompat/v7/config" >/dev/null
}

stop_registry() { stop_pidfile "$STATE/registry/registry.pid" registry 30; }

# --- TLS -------------------------------------------------------------------------

# A CA, a server certificate for 127.0.0.1 and localhost signed by it, and the Kafka
# listener's password; made once.
ensure_tls_files() {
  local dir="$STATE/tls"
  [[ -f $dir/.complete ]] && return 0
  log "making a CA and a server certificate in $dir"
  rm -rf "$dir" && mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=newsroom local CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -extfile "$dir/san.ext" -out "$dir/server.pem" 2>/dev/null
  # Kafka's PEM key store: the unencrypted PKCS#8 key, then the chain.
  openssl pkcs8 -topk8 -nocrypt -in "$dir/server.key" -out "$dir/server-pkcs8.key"
  cat "$dir/server-pkcs8.key" "$dir/server.pem" >"$dir/server-bundle.pem"
  openssl rand -hex 16 >"$dir/kafka-password"
  chmod 600 "$dir"/*.key "$dir/server-bundle.pem" "$dir/kafka-password"
  touch "$dir/.complete"
}

pg_tls_ready() { "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_TLS_PORT"; }
redis_tls_ready() {
  [[ $(redis-cli --tls --cacert "$STATE/tls/ca.pem" -h "$HOST" -p "$REDIS_TLS_PORT" ping 2>/dev/null) == PONG ]]
}

start_tls() {
  ensure_tls_files
  local dir="$STATE/postgres-tls" data="$STATE/postgres-tls/data"
  if pg_tls_ready; then
    log "postgres (TLS) already answers on $HOST:$PG_TLS_PORT"
  else
    mkdir -p "$dir"
    [[ $(id -u) -ne 0 ]] || chown postgres: "$dir"
    if [[ ! -f $data/PG_VERSION ]]; then
      log "initialising a PostgreSQL cluster for TLS in $data"
      as_pg_owner "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust --auth-host=reject \
        -E UTF8 --locale=C.UTF-8 >/dev/null
      # TLS connections only (no plain `host` line), with a password.
      printf 'local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n' >"$data/pg_hba.conf"
      [[ $(id -u) -ne 0 ]] || chown postgres: "$data/pg_hba.conf"
    fi
    # The certificate of this run's CA (it may have been made again since).
    install -m 600 "$STATE/tls/server.key" "$data/server.key"
    install -m 644 "$STATE/tls/server.pem" "$data/server.crt"
    [[ $(id -u) -ne 0 ]] || chown postgres: "$data/server.key" "$data/server.crt"
    as_pg_owner "$PG_BIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 start \
      -o "-c listen_addresses=$HOST -c port=$PG_TLS_PORT -c unix_socket_directories=$dir -c ssl=on -c max_connections=60 -c shared_buffers=16MB" \
      >/dev/null
    wait_for postgres-tls 60 pg_tls_ready
    as_pg_owner "$PG_BIN/psql" -q -h "$dir" -p "$PG_TLS_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'newsroom') THEN
    CREATE ROLE newsroom LOGIN CREATEDB PASSWORD 'newsroom';
  END IF;
END $$;
SQL
    if ! as_pg_owner "$PG_BIN/psql" -h "$dir" -p "$PG_TLS_PORT" -U postgres -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'newsroom'" | grep -q 1; then
      as_pg_owner "$PG_BIN/psql" -q -h "$dir" -p "$PG_TLS_PORT" -U postgres -d postgres \
        -c "CREATE DATABASE newsroom OWNER newsroom" >/dev/null
    fi
  fi
  if redis_tls_ready; then
    log "redis (TLS) already answers on $HOST:$REDIS_TLS_PORT"
  else
    mkdir -p "$STATE/redis-tls"
    redis-server --bind "$HOST" --port 0 --tls-port "$REDIS_TLS_PORT" --daemonize yes \
      --tls-cert-file "$STATE/tls/server.pem" --tls-key-file "$STATE/tls/server.key" \
      --tls-ca-cert-file "$STATE/tls/ca.pem" --tls-auth-clients no --dir "$STATE/redis-tls" \
      --pidfile "$STATE/redis-tls/redis.pid" --logfile "$STATE/redis-tls/redis.log" \
      --appendonly no --save "" --protected-mode yes
    wait_for redis-tls 30 redis_tls_ready
  fi
  # The broker's SASL_SSL listener comes with it (start_kafka).
  [[ $KAFKA_SASL_SSL_PORT == 0 ]] || port_open "$KAFKA_SASL_SSL_PORT" ||
    log "kafka has no SASL_SSL listener on $HOST:$KAFKA_SASL_SSL_PORT yet: infra/local.sh up kafka"
}

stop_tls() {
  if [[ -f $STATE/postgres-tls/data/postmaster.pid ]]; then
    as_pg_owner "$PG_BIN/pg_ctl" -D "$STATE/postgres-tls/data" -m fast -w stop >/dev/null || true
  fi
  stop_pidfile "$STATE/redis-tls/redis.pid" redis-tls 10
}

# --- SMTP (capturing) -----------------------------------------------------------

smtp_ready() { port_open "$SMTP_PORT"; }

start_smtp() {
  if pid_alive "$STATE/smtp/smtp.pid" && smtp_ready; then
    log "smtp already answers on $HOST:$SMTP_PORT"
    return 0
  fi
  mkdir -p "$STATE/smtp/mail"
  # Debian's interpreter: python3-aiosmtpd is installed for it (a pyenv or venv python3
  # earlier on PATH would not see it).
  nohup /usr/bin/python3 "$ROOT/infra/smtp_capture.py" --host "$HOST" --port "$SMTP_PORT" \
    --dir "$STATE/smtp/mail" >"$STATE/smtp/smtp.log" 2>&1 &
  echo $! >"$STATE/smtp/smtp.pid"
  wait_for smtp 30 smtp_ready
}

stop_smtp() { stop_pidfile "$STATE/smtp/smtp.pid" smtp 10; }

# --- commands -----------------------------------------------------------------

SERVICES=(postgres redis kafka registry smtp tls)

check_service() {
  case $1 in
    postgres | redis | kafka | registry | smtp | tls) ;;
    *) die "unknown service '$1' (one of: ${SERVICES[*]})" ;;
  esac
}

cmd_up() {
  mkdir -p "$STATE"
  local started=$SECONDS
  if [[ -n ${1:-} ]]; then
    check_service "$1"
    "start_$1"
  else
    install_deps
    for s in "${SERVICES[@]}"; do "start_$s"; done
  fi
  log "up in $((SECONDS - started))s"
  # One service brought up answers for itself (start_* waited for it); the others' state
  # is shown, not judged.
  if [[ -n ${1:-} ]]; then cmd_status || true; else cmd_status; fi
}

cmd_down() {
  if [[ -n ${1:-} ]]; then
    check_service "$1"
    "stop_$1"
    return
  fi
  local i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do "stop_${SERVICES[i]}"; done
  log "stopped"
}

cmd_status() {
  local ok=0
  row() { printf '%-9s %-22s %s\n' "$1" "$2" "$3"; }
  row SERVICE ADDRESS STATE
  if pg_ready; then row postgres "$HOST:$PG_PORT" up; else row postgres "$HOST:$PG_PORT" down; ok=1; fi
  if redis_ready; then row redis "$HOST:$REDIS_PORT" up; else row redis "$HOST:$REDIS_PORT" down; ok=1; fi
  if port_open "$KAFKA_PORT"; then row kafka "$HOST:$KAFKA_PORT" up; else row kafka "$HOST:$KAFKA_PORT" down; ok=1; fi
  if registry_ready; then
    row registry "http://$HOST:$REGISTRY_PORT/apis/ccompat/v7" up
  else
    row registry "http://$HOST:$REGISTRY_PORT/apis/ccompat/v7" down
    ok=1
  fi
  if smtp_ready; then row smtp "$HOST:$SMTP_PORT" up; else row smtp "$HOST:$SMTP_PORT" down; ok=1; fi
  if pg_tls_ready; then row pg-tls "$HOST:$PG_TLS_PORT" up; else row pg-tls "$HOST:$PG_TLS_PORT" down; ok=1; fi
  if redis_tls_ready; then row redis-tls "$HOST:$REDIS_TLS_PORT" up; else row redis-tls "$HOST:$REDIS_TLS_PORT" down; ok=1; fi
  if port_open "$KAFKA_SASL_SSL_PORT"; then
    row kafka-tls "$HOST:$KAFKA_SASL_SSL_PORT" up
  else
    row kafka-tls "$HOST:$KAFKA_SASL_SSL_PORT" down
    ok=1
  fi
  return $ok
}

case ${1:-} in
  up) cmd_up "${2:-}" ;;
  down) cmd_down "${2:-}" ;;
  status) cmd_status ;;
  deps) mkdir -p "$STATE" && install_deps ;;
  cluster) cmd_cluster "${2:-}" "${3:-}" ;;
  reset) cmd_cluster down && cmd_down && rm -rf "$STATE" && log "removed $STATE" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
