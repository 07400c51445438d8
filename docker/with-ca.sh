#!/bin/sh
# with-ca.sh CMD...: run CMD trusting the extra CA certificates given to the build as the secret `ca`
# (`docker build --secret id=ca,src=FILE`, what `inv image --ca FILE` passes), on top of the usual ones:
# for users behind a TLS-intercepting proxy.  The bundle lives only for this command: nothing of it stays in
# a layer, and the image trusts only its own certificates at run time.
set -eu
if [ -s /run/secrets/ca ]; then
    bundle="$(mktemp)"
    trap 'rm -f "$bundle"' EXIT
    for base in /etc/ssl/certs/ca-certificates.crt \
        "$(python3 -c 'import pip._vendor.certifi as c; print(c.where())' 2>/dev/null || true)"; do
        if [ -n "$base" ] && [ -s "$base" ]; then cat "$base" >>"$bundle"; fi
    done
    cat /run/secrets/ca >>"$bundle"
    export PIP_CERT="$bundle" REQUESTS_CA_BUNDLE="$bundle" SSL_CERT_FILE="$bundle"
fi
"$@"
