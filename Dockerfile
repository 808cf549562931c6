# gridtrade images, one Dockerfile, three targets:
#
#   gridtrade (default)  python:3.11-slim + `pip install .`; entrypoint `gridtrade`.
#                        Runs every service: bus hub, chain, auction, meter, gateway.
#                        No node: the contracts' ABI and bytecode are committed, so the
#                        chain service needs no compiler at run time.
#   anvil                the dev chain node: anvil's native binary from the pinned npm
#                        package (package-lock.json), on the same slim base; no node.
#   tools                gridtrade + node + node_modules (solc, anvil): rebuild the
#                        contracts (`python -m contracts.build`), run the test suite.
#
#   docker build -t gridtrade .                     docker build --target anvil -t gridtrade-anvil .
#
# docker-compose.yml builds these; see it for the sites and their settings.

ARG PYTHON_IMAGE=python:3.11-slim
ARG NODE_IMAGE=node:20-bookworm-slim

# --- node tools, only for the stages that need them ------------------------------------
FROM ${NODE_IMAGE} AS node-tools
WORKDIR /opt/gridtrade
COPY package.json package-lock.json ./
# npm install, not npm ci: ci refuses this lock file (it lacks the optional anvil builds of other platforms)
RUN npm install --no-audit --no-fund --loglevel=error

# --- the services (the default target is the last stage, `gridtrade`, built from this) -
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRIDTRADE_DATA_DIR=/data \
    GRIDTRADE_KEYS_DIR=/keys
RUN groupadd --system --gid 10001 gridtrade \
 && useradd --system --uid 10001 --gid gridtrade --home-dir /data --no-create-home gridtrade \
 && mkdir -p /data /keys \
 && chown gridtrade:gridtrade /data /keys
WORKDIR /opt/gridtrade
# README.m[d]: copied when present (pyproject.toml names it), no error when it is not
COPY pyproject.toml README.m[d] ./
COPY contracts ./contracts
COPY services ./services
RUN pip install . && rm -rf build *.egg-info
USER gridtrade
WORKDIR /data
VOLUME ["/data", "/keys"]
# bus hub 5550/5551, chain 5560, auction 5561, replay 5570-5573, metrics 9100, gateway 8080
EXPOSE 5550 5551 5560 5561 5570 5571 5572 5573 8080 9100
ENTRYPOINT ["gridtrade"]
CMD ["--help"]

# --- the dev chain node ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS anvil
ARG TARGETARCH=amd64
COPY --from=node-tools /opt/gridtrade/node_modules/@foundry-rs/anvil-linux-${TARGETARCH}/bin/anvil /usr/local/bin/anvil
RUN useradd --system --uid 10001 --home-dir /anvil --create-home anvil
USER anvil
WORKDIR /anvil
VOLUME ["/anvil"]
EXPOSE 8545
ENTRYPOINT ["anvil"]
CMD ["--host", "0.0.0.0", "--port", "8545", "--state", "/anvil/state.json", "--state-interval", "1"]

# --- tools: the services plus node, solc and anvil -------------------------------------
FROM runtime AS tools
USER root
COPY --from=node-tools /usr/local/bin/node /usr/local/bin/node
COPY --from=node-tools /opt/gridtrade/node_modules /opt/gridtrade/node_modules
ENV PATH=/opt/gridtrade/node_modules/.bin:$PATH
USER gridtrade

# --- the default target: the services ---------------------------------------------------
FROM runtime AS gridtrade
