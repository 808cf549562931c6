# gridtrade images, one Dockerfile, three targets:
#
#   gridtrade (default)  python:3.11-slim + a virtual environment (/opt/venv) holding
#                        gridtrade and its Python packages; runs as the user gridtrade
#                        (uid 10001); entrypoint `gridtrade`. Runs every service: bus hub,
#                        chain (operator or site wallet), auction, meter, gateway. No node,
#                        no pip, no compiler: the contracts' ABI and bytecode are committed.
#   anvil                the dev chain node: anvil's native binary from the pinned npm
#                        package (package-lock.json), on the same slim base; no node.
#   tools                gridtrade + node + node_modules (solc, anvil): rebuild the
#                        contracts (`python -m contracts.build`), run the test suite.
#                        (Needs the official node image: it copies its /usr/local/bin/node.)
#
# Both images check their health with services/healthcheck.py: the service the container
# runs, asked on its own /healthz (anvil: eth_chainId), at the port its GRIDTRADE_*
# variables give it.
#
# BuildKit builds it (`docker compose build`, `docker build` of Docker 23+; with the
# docker-compose 1.x of Debian: DOCKER_BUILDKIT=1 COMPOSE_DOCKER_CLI_BUILD=1):
#
#   docker build -t gridtrade .                     docker build --target anvil -t gridtrade-anvil .
#
# Behind a TLS-intercepting proxy, pip and npm trust its CA through a build secret, which
# is mounted for the downloading steps only and never stored in an image:
#
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t gridtrade .
#
# PYTHON_IMAGE and NODE_IMAGE name the bases (any Debian bookworm with python3 and
# python3-venv, resp. node and npm, will do: the tests build on a local stand-in).
#
# docker-compose.yml builds these; see it for the sites and their settings.

ARG PYTHON_IMAGE=python:3.11-slim
ARG NODE_IMAGE=node:20-bookworm-slim

# --- node tools, only for the stages that need them ------------------------------------
FROM ${NODE_IMAGE} AS node-tools
WORKDIR /opt/gridtrade
COPY package.json package-lock.json ./
# npm install, not npm ci: ci refuses this lock file (it lacks the optional anvil builds of other platforms)
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then \
      export NODE_EXTRA_CA_CERTS=/run/secrets/ca_bundle npm_config_cafile=/run/secrets/ca_bundle; fi \
 && npm install --no-audit --no-fund --loglevel=error

# --- the virtual environment, built apart: pip, its cache and the sources stay here ------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /opt/gridtrade
# the dependencies first (their layer is rebuilt only when pyproject.toml changes) ...
# (less the bundled test suites of numpy, scipy and pandas: never imported, a sixth of the venv)
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && mkdir -p services contracts && touch README.md \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip uninstall -y gridtrade \
 && rm -rf build *.egg-info services contracts README.md \
 && find /opt/venv/lib -depth -type d -name tests \
      \( -path "*/numpy/*" -o -path "*/scipy/*" -o -path "*/pandas/*" \) -exec rm -rf {} +
# ... then gridtrade itself (its build backend is downloaded too); pip stays in this stage
# README.m[d]: copied when present (pyproject.toml names it), no error when it is not
COPY README.m[d] ./
COPY contracts ./contracts
COPY services ./services
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip uninstall -y pip setuptools \
 && rm -rf build *.egg-info

# --- the services (the default target is the last stage, `gridtrade`, built from this) -
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GRIDTRADE_DATA_DIR=/data \
    GRIDTRADE_KEYS_DIR=/keys \
    GRIDTRADE_METRICS_PORT=9100
RUN groupadd --system --gid 10001 gridtrade \
 && useradd --system --uid 10001 --gid gridtrade --home-dir /data --no-create-home gridtrade \
 && mkdir -p /data /keys \
 && chown gridtrade:gridtrade /data /keys
COPY --from=venv /opt/venv /opt/venv
USER gridtrade
WORKDIR /data
VOLUME ["/data", "/keys"]
# bus hub 5550/5551, chain 5560, auction 5561, replay 5570-5573, metrics 9100, gateway 8080
EXPOSE 5550 5551 5560 5561 5570 5571 5572 5573 8080 9100
# the running service's /healthz (services/healthcheck.py): the gateway's on its HTTP port,
# the others' on GRIDTRADE_METRICS_PORT (9100 unless set; GRIDTRADE_METRICS_HOST=0.0.0.0 serves
# /healthz and /metrics beyond the container, as docker-compose.yml does)
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "services.healthcheck"]
ENTRYPOINT ["gridtrade"]
CMD ["--help"]

# --- the dev chain node ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS anvil
ARG TARGETARCH=amd64
COPY --from=node-tools /opt/gridtrade/node_modules/@foundry-rs/anvil-linux-${TARGETARCH}/bin/anvil /usr/local/bin/anvil
COPY services/healthcheck.py /usr/local/lib/gridtrade-healthcheck.py
RUN useradd --system --uid 10001 --home-dir /anvil --create-home anvil
USER anvil
WORKDIR /anvil
VOLUME ["/anvil"]
EXPOSE 8545
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "/usr/local/lib/gridtrade-healthcheck.py"]
ENTRYPOINT ["anvil"]
CMD ["--host", "0.0.0.0", "--port", "8545", "--state", "/anvil/state.json", "--state-interval", "1"]

# --- tools: the services plus node, solc and anvil -------------------------------------
FROM runtime AS tools
USER root
COPY --from=venv /opt/gridtrade /opt/gridtrade
COPY --from=node-tools /usr/local/bin/node /usr/local/bin/node
COPY --from=node-tools /opt/gridtrade/node_modules /opt/gridtrade/node_modules
ENV PATH=/opt/gridtrade/node_modules/.bin:$PATH
USER gridtrade

# --- the default target: the services ---------------------------------------------------
FROM runtime AS gridtrade
