# convsplit: build, test and demo. Every target installs what it needs.
SHELL := /bin/bash
# Go's release archive installs to /usr/local/go, which a fresh shell may not
# have on PATH.
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
PYTHON := /usr/bin/python3
FIXTURES := build/fixtures
SHIM := build/libshim.a
SHIM_SOURCES := $(wildcard csrc/*.cpp csrc/*.h) CMakeLists.txt

.PHONY: all deps shim build fixtures test vet run clean

all: build

deps:
	@bash scripts/install-deps.sh
	@command -v $(GO) >/dev/null || { echo "Go is missing: install Go 1.22 or newer" >&2; exit 1; }

build/Makefile: CMakeLists.txt
	cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null

# The stamp file tells Go's build cache that the static library changed,
# since cgo does not hash the libraries it links.
$(SHIM): build/Makefile $(SHIM_SOURCES)
	$(MAKE) -C build --no-print-directory -j2 shim
	@printf 'package torch\n\n// shimStamp changes whenever build/libshim.a does, so that Go'"'"'s build cache\n// relinks programs against the new library.\nconst shimStamp = "%s"\n' \
		"$$(sha256sum $(SHIM) | cut -c1-16)" > torch/shim_stamp.go

shim: deps $(SHIM)

build: shim
	$(GO) build -o bin/convsplit ./cmd/convsplit

fixtures: deps
	$(PYTHON) scripts/fixtures.py $(FIXTURES)

vet: shim
	@test -z "$$(gofmt -l cmd decompose torch examples)" || { gofmt -l cmd decompose torch examples; echo "gofmt: files above need formatting" >&2; exit 1; }
	$(GO) vet ./...

test: build fixtures vet
	CONVSPLIT_FIXTURES=$(abspath $(FIXTURES)) $(GO) test -count=1 ./...
	@echo "race detector on concurrent Network calls"
	CONVSPLIT_FIXTURES=$(abspath $(FIXTURES)) $(GO) test -count=1 -race -run Concurrent ./decompose/
	@echo "fuzz smoke runs of the information-file parser and validation"
	CONVSPLIT_FIXTURES=$(abspath $(FIXTURES)) $(GO) test -run '^$$' -fuzz '^FuzzParseInfo$$' -fuzztime 10s -parallel 1 ./decompose/
	CONVSPLIT_FIXTURES=$(abspath $(FIXTURES)) $(GO) test -run '^$$' -fuzz '^FuzzScanInfo$$' -fuzztime 10s -parallel 1 ./decompose/
	CONVSPLIT_FIXTURES=$(abspath $(FIXTURES)) $(GO) test -run '^$$' -fuzz '^FuzzNetworkInfo$$' -fuzztime 10s -parallel 1 ./decompose/

run: build
	bash scripts/demo.sh

clean:
	rm -rf bin build/CMakeFiles build/CMakeCache.txt build/Makefile build/cmake_install.cmake $(SHIM) torch/shim_stamp.go
