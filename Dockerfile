# The broker image: one image for the broker and the worker services (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY workers ./workers
RUN pip install --no-cache-dir .
COPY config ./config
COPY mappings ./mappings
RUN useradd --system --home /app broker && mkdir -p /app/var && chown broker /app/var
USER broker
EXPOSE 2575 11112 8080
ENTRYPOINT ["broker"]
CMD ["run"]
