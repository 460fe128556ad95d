#!/usr/bin/env bash
# TLS material for Kafka with nothing but keytool (the Kafka image's JRE has it; so does any JDK):
# a private CA, one broker certificate for every broker name, and an admin client certificate.
#
#   tls.sh PRIVATE_DIR PUBLIC_DIR NAMES
#
#   NAMES        the names clients reach the brokers by, comma-separated host names and IP
#                addresses: kafka-1,kafka-2,localhost,127.0.0.1 (the broker certificate's SAN)
#   PUBLIC_DIR   ca.crt (PEM): what every client needs to trust the brokers
#   PRIVATE_DIR  ca.p12 (the CA's key), broker.p12 (key + chain, CN=broker), truststore.p12 (the
#                CA), admin.p12 (key + chain, CN=admin, a client certificate) and their passwords
#                (*.password, one line each); broker-client.properties, a Java client config
#                with the broker's own certificate (healthchecks, kafka-*.sh tools on a broker);
#                san.txt (the names broker.p12 was issued for)
#
# Run again, it keeps what exists: the CA is made once (clients keep trusting ca.crt), the broker
# certificate is issued again only when NAMES changed (a new KAFKA_EXTERNAL_HOST), the admin
# certificate only when missing. Run as root with BROKER_UID / ADMIN_UID set (docker-compose.yml
# certs-init does), the broker's and the admin's files are given to those users and nobody else.
# Used by docker-compose.yml (service certs-init) and by toolkit/localkafka.py (tests).
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: tls.sh PRIVATE_DIR PUBLIC_DIR NAMES" >&2
  exit 2
fi
private=$1 public=$2 names=$3
san=""
IFS=, read -ra each_name <<< "$names"
for name in "${each_name[@]}"; do
  case $name in
    "") continue ;;
    *[!0-9.]*) if [[ $name == *:* ]]; then kind=ip; else kind=dns; fi ;;   # IPv6 has colons
    *) kind=ip ;;                                                          # digits and dots: IPv4
  esac
  san="${san:+$san,}$kind:$name"
done
days_ca=3650
days_leaf=825
mkdir -p "$private" "$public"
umask 077

# A password keytool accepts (6+ characters) and a properties file can hold as it is.
new_password() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

password_of() {   # the password file of a store, made once
  local file="$private/$1.password"
  [ -s "$file" ] || new_password > "$file"
  cat "$file"
}

# keytool prints "Generating ..." chatter on stderr even when all is well: keep it for failures.
kt() {
  local out
  # A short-lived JVM: no JIT tiers beyond the first, the serial collector, no perf data file.
  if ! out=$(keytool -J-XX:TieredStopAtLevel=1 -J-XX:+UseSerialGC -J-XX:-UsePerfData "$@" 2>&1); then
    echo "tls.sh: keytool $1 failed: $out" >&2
    exit 1
  fi
}

ca_pass=$(password_of ca)
if [ ! -s "$private/ca.p12" ]; then
  kt -genkeypair -keystore "$private/ca.p12" -storetype PKCS12 -storepass "$ca_pass" -alias ca \
     -dname "CN=logwarden Kafka CA" -keyalg EC -groupname secp256r1 -validity "$days_ca" \
     -ext bc:c -ext ku:c=keyCertSign,cRLSign
  rm -f "$public/ca.crt" "$private/truststore.p12" "$private/broker.p12" "$private/admin.p12"
  echo "tls.sh: made a new CA in $private/ca.p12"
fi
if [ ! -s "$public/ca.crt" ]; then
  kt -exportcert -rfc -keystore "$private/ca.p12" -storepass "$ca_pass" -alias ca -file "$public/ca.crt"
fi
chmod 0644 "$public/ca.crt"

trust_pass=$(password_of truststore)
if [ ! -s "$private/truststore.p12" ]; then
  kt -importcert -noprompt -keystore "$private/truststore.p12" -storetype PKCS12 \
     -storepass "$trust_pass" -alias ca -file "$public/ca.crt"
fi

# issue NAME CN EXTENSIONS...: a key pair in NAME.p12, signed by the CA, with the CA in its chain.
issue() {
  local name=$1 cn=$2; shift 2
  local store="$private/$name.p12" pass
  pass=$(password_of "$name")
  rm -f "$store" "$private/$name.csr" "$private/$name.crt"
  kt -genkeypair -keystore "$store" -storetype PKCS12 -storepass "$pass" -alias "$name" \
     -dname "CN=$cn" -keyalg EC -groupname secp256r1 -validity "$days_leaf"
  kt -certreq -keystore "$store" -storepass "$pass" -alias "$name" -file "$private/$name.csr"
  kt -gencert -keystore "$private/ca.p12" -storepass "$ca_pass" -alias ca -rfc \
     -infile "$private/$name.csr" -outfile "$private/$name.crt" -validity "$days_leaf" "$@"
  kt -importcert -noprompt -keystore "$store" -storepass "$pass" -alias ca -file "$public/ca.crt"
  kt -importcert -noprompt -keystore "$store" -storepass "$pass" -alias "$name" -file "$private/$name.crt"
  rm -f "$private/$name.csr"
  echo "tls.sh: issued $store (CN=$cn)"
}

if [ ! -s "$private/broker.p12" ] || [ "$(cat "$private/san.txt" 2>/dev/null)" != "$san" ]; then
  # Brokers are servers to clients and clients of each other (inter-broker and controller
  # listeners use mutual TLS), so both key usages.
  issue broker broker -ext "san=$san" -ext ku:c=digitalSignature,keyAgreement \
        -ext eku=serverAuth,clientAuth
  printf '%s\n' "$san" > "$private/san.txt"
fi
if [ ! -s "$private/admin.p12" ]; then
  issue admin admin -ext ku:c=digitalSignature,keyAgreement -ext eku=clientAuth
fi
cat > "$private/broker-client.properties" <<EOF
security.protocol=SSL
ssl.keystore.type=PKCS12
ssl.keystore.location=$(cd "$private" && pwd)/broker.p12
ssl.keystore.password=$(password_of broker)
ssl.truststore.type=PKCS12
ssl.truststore.location=$(cd "$private" && pwd)/truststore.p12
ssl.truststore.password=$(password_of truststore)
EOF

# Who may read what: the broker's files for the Kafka user, the admin's for the init job.
if [ "$(id -u)" = 0 ]; then
  [ -z "${BROKER_UID:-}" ] || chown "$BROKER_UID" "$private"/broker* "$private"/truststore.* "$private/san.txt"
  [ -z "${ADMIN_UID:-}" ] || chown "$ADMIN_UID" "$private"/admin.*
  chmod 0711 "$private"      # files are found by name; the directory lists nothing
fi
chmod 0600 "$private"/*.p12 "$private"/*.password "$private"/*.crt "$private"/*.properties
