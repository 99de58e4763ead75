// Package testutil finds the repository's test inputs and runs the Python
// side of convsplit's tests: TorchScript fixtures made with Debian's
// python3-torch, and checks of what Go wrote.
package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
)

// Python is the interpreter that has torch; the first python3 on PATH may not.
const Python = "/usr/bin/python3"

// Root returns the repository's top folder.
func Root() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Path returns a path below the repository's top folder.
func Path(elem ...string) string {
	return filepath.Join(append([]string{Root()}, elem...)...)
}

// AMCT returns the path of a file of AMCT's acceptance data, such as
// AMCT("mixed", "decompose_info.json").
func AMCT(elem ...string) string {
	return Path(append([]string{"testdata", "amct"}, elem...)...)
}

// FixtureDir returns the folder of the TorchScript fixtures:
// $CONVSPLIT_FIXTURES, or build/fixtures.
func FixtureDir() string {
	if dir := os.Getenv("CONVSPLIT_FIXTURES"); dir != "" {
		return dir
	}
	return Path("build", "fixtures")
}

var fixtureMu sync.Mutex

// Fixture returns the path of the TorchScript fixture NAME.pt (for example
// "mixed" or "resnet18_traced"), making it with scripts/fixtures.py when it
// is missing. The test is skipped when Python's torch is not installed.
func Fixture(t testing.TB, name string) string {
	t.Helper()
	path := filepath.Join(FixtureDir(), name+".pt")
	if _, err := os.Stat(path); err == nil {
		return path
	}
	fixtureMu.Lock()
	defer fixtureMu.Unlock()
	if _, err := os.Stat(path); err == nil {
		return path
	}
	RequirePython(t)
	model := name
	if base, ok := cutSuffix(name, "_traced"); ok {
		model = base
	}
	out, err := exec.Command(Python, Path("scripts", "fixtures.py"), FixtureDir(), model).CombinedOutput()
	if err != nil {
		t.Fatalf("making fixture %s: %v\n%s", name, err, out)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("fixtures.py did not write %s: %v\n%s", path, err, out)
	}
	return path
}

func cutSuffix(s, suffix string) (string, bool) {
	if len(s) >= len(suffix) && s[len(s)-len(suffix):] == suffix {
		return s[:len(s)-len(suffix)], true
	}
	return s, false
}

// RequirePython skips the test when /usr/bin/python3 cannot import torch.
func RequirePython(t testing.TB) {
	t.Helper()
	if err := exec.Command(Python, "-c", "import torch").Run(); err != nil {
		t.Skipf("%s cannot import torch (run scripts/install-deps.sh): %v", Python, err)
	}
}

// RunPython runs a Python script of scripts/ with the arguments and returns
// its combined output; the test fails when the script exits non-zero.
func RunPython(t testing.TB, script string, args ...string) string {
	t.Helper()
	RequirePython(t)
	cmd := exec.Command(Python, append([]string{Path("scripts", script)}, args...)...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %v: %v\n%s", script, args, err, out.String())
	}
	return out.String()
}

// PythonCode runs Python source with the arguments in sys.argv[1:] and
// returns its standard output; the test fails when it exits non-zero.
func PythonCode(t testing.TB, code string, args ...string) string {
	t.Helper()
	RequirePython(t)
	cmd := exec.Command(Python, append([]string{"-c", code}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("python: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// CopyFile copies src to a new file in t.TempDir() and returns its path.
func CopyFile(t testing.TB, src string) string {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), filepath.Base(src))
	if err := os.WriteFile(dst, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return dst
}
