package torch

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"math/big"
	"strconv"
)

// This file reads and writes the data.pkl record of a torch.save archive.
// That record is a Python pickle whose tensors are calls of
// torch._utils._rebuild_tensor_v2 on storages. The pickle names each storage
// through a persistent id ('storage', torch.FloatStorage, KEY, LOCATION,
// NUMEL), and the storage's bytes are the archive's record data/KEY. The reader understands the opcodes Python's
// pickle writes for dicts, OrderedDicts, tuples, lists, numbers, strings and
// tensors (protocols 2 to 5) and rejects any other class, so that no file can
// make it build an object it does not know.

// ErrPickle is wrapped by errors about a data.pkl record that convsplit
// cannot read.
var ErrPickle = errors.New("unsupported pickle")

// Pickle opcodes, as Python's pickle module names them.
const (
	opMark           = '('
	opStop           = '.'
	opPop            = '0'
	opPopMark        = '1'
	opDup            = '2'
	opBinFloat       = 'G'
	opBinInt         = 'J'
	opBinInt1        = 'K'
	opBinInt2        = 'M'
	opNone           = 'N'
	opBinPersID      = 'Q'
	opReduce         = 'R'
	opBinString      = 'T'
	opShortBinString = 'U'
	opBinUnicode     = 'X'
	opAppend         = 'a'
	opBuild          = 'b'
	opGlobal         = 'c'
	opAppends        = 'e'
	opBinGet         = 'h'
	opLongBinGet     = 'j'
	opEmptyList      = ']'
	opBinPut         = 'q'
	opLongBinPut     = 'r'
	opSetItem        = 's'
	opTuple          = 't'
	opSetItems       = 'u'
	opEmptyTuple     = ')'
	opEmptyDict      = '}'
	opProto          = 0x80
	opNewObj         = 0x81
	opTuple1         = 0x85
	opTuple2         = 0x86
	opTuple3         = 0x87
	opNewTrue        = 0x88
	opNewFalse       = 0x89
	opLong1          = 0x8a
	opLong4          = 0x8b
	opBinBytes       = 'B'
	opShortBinBytes  = 'C'
	opShortBinUni    = 0x8c
	opBinUnicode8    = 0x8d
	opBinBytes8      = 0x8e
	opEmptySet       = 0x8f
	opStackGlobal    = 0x93
	opMemoize        = 0x94
	opFrame          = 0x95
)

// pickleGlobal is a class or function named by a GLOBAL opcode.
type pickleGlobal struct {
	module, name string
}

func (g pickleGlobal) String() string { return g.module + "." + g.name }

// pickleTuple is a Python tuple.
type pickleTuple []any

// pickleList is a Python list; a pointer, because APPEND changes it.
type pickleList struct {
	items []any
}

// pickleDict is a Python dict or OrderedDict with its keys in insertion
// order. Keys are strings or integers.
type pickleDict struct {
	keys   []any
	values map[any]any
}

func newPickleDict() *pickleDict { return &pickleDict{values: map[any]any{}} }

func (d *pickleDict) set(key, value any) error {
	switch key.(type) {
	case string, int64, bool, nil:
	default:
		return fmt.Errorf("%w: dict key of type %T", ErrPickle, key)
	}
	if _, ok := d.values[key]; !ok {
		d.keys = append(d.keys, key)
	}
	d.values[key] = value
	return nil
}

// storageRef is a storage named by a persistent id; its bytes are the
// archive record data/key.
type storageRef struct {
	dtype DType
	key   string
	numel int64
}

// tensorRef is a tensor rebuilt from a storage: the arguments of
// torch._utils._rebuild_tensor_v2.
type tensorRef struct {
	storage      *storageRef
	offset       int64
	size, stride []int64
	requiresGrad bool
}

// storageTypes maps torch's typed storage classes to their element types.
var storageTypes = map[string]DType{
	"FloatStorage": Float32, "DoubleStorage": Float64, "HalfStorage": Float16,
	"BFloat16Storage": BFloat16, "LongStorage": Int64, "IntStorage": Int32,
	"ShortStorage": Int16, "CharStorage": Int8, "ByteStorage": Uint8, "BoolStorage": Bool,
}

var (
	globalOrderedDict   = pickleGlobal{"collections", "OrderedDict"}
	globalRebuildTensor = pickleGlobal{"torch._utils", "_rebuild_tensor_v2"}
	globalRebuildParam  = pickleGlobal{"torch._utils", "_rebuild_parameter"}
)

// pickleMark separates the items of MARK ... TUPLE and similar on the stack.
type pickleMark struct{}

type unpickler struct {
	r     *bytes.Reader
	stack []any
	memo  map[int64]any
}

// unpickle decodes a data.pkl record and returns its top-level value.
func unpickle(data []byte) (any, error) {
	u := &unpickler{r: bytes.NewReader(data), memo: map[int64]any{}}
	for {
		pos := len(data) - u.r.Len()
		op, err := u.r.ReadByte()
		if err != nil {
			return nil, fmt.Errorf("%w: the pickle ends without a STOP opcode", ErrPickle)
		}
		done, err := u.step(op)
		if err != nil {
			return nil, fmt.Errorf("pickle opcode 0x%02x at byte %d: %w", op, pos, err)
		}
		if done {
			if len(u.stack) != 1 {
				return nil, fmt.Errorf("%w: %d values left on the stack at STOP", ErrPickle, len(u.stack))
			}
			return u.stack[0], nil
		}
	}
}

func (u *unpickler) push(v any) { u.stack = append(u.stack, v) }

func (u *unpickler) pop() (any, error) {
	if len(u.stack) == 0 {
		return nil, fmt.Errorf("%w: stack underflow", ErrPickle)
	}
	v := u.stack[len(u.stack)-1]
	u.stack = u.stack[:len(u.stack)-1]
	if _, ok := v.(pickleMark); ok {
		return nil, fmt.Errorf("%w: unexpected MARK on the stack", ErrPickle)
	}
	return v, nil
}

func (u *unpickler) top() (any, error) {
	if len(u.stack) == 0 {
		return nil, fmt.Errorf("%w: stack underflow", ErrPickle)
	}
	return u.stack[len(u.stack)-1], nil
}

// popMark returns the values above the topmost MARK and removes them and
// the MARK from the stack.
func (u *unpickler) popMark() ([]any, error) {
	for i := len(u.stack) - 1; i >= 0; i-- {
		if _, ok := u.stack[i].(pickleMark); ok {
			items := append([]any(nil), u.stack[i+1:]...)
			u.stack = u.stack[:i]
			return items, nil
		}
	}
	return nil, fmt.Errorf("%w: no MARK on the stack", ErrPickle)
}

func (u *unpickler) readN(n uint64) ([]byte, error) {
	if n > uint64(u.r.Len()) {
		return nil, fmt.Errorf("%w: an argument of %d bytes runs past the end", ErrPickle, n)
	}
	buf := make([]byte, n)
	_, err := io.ReadFull(u.r, buf)
	return buf, err
}

func (u *unpickler) readUint(size int) (uint64, error) {
	buf, err := u.readN(uint64(size))
	if err != nil {
		return 0, err
	}
	var v uint64
	for i := size - 1; i >= 0; i-- {
		v = v<<8 | uint64(buf[i])
	}
	return v, nil
}

func (u *unpickler) readLine() (string, error) {
	var line []byte
	for {
		b, err := u.r.ReadByte()
		if err != nil {
			return "", fmt.Errorf("%w: a line argument runs past the end", ErrPickle)
		}
		if b == '\n' {
			return string(line), nil
		}
		line = append(line, b)
	}
}

// step runs one opcode and reports whether it was STOP.
func (u *unpickler) step(op byte) (bool, error) {
	switch op {
	case opProto:
		if _, err := u.readN(1); err != nil {
			return false, err
		}
	case opFrame:
		if _, err := u.readUint(8); err != nil {
			return false, err
		}
	case opStop:
		return true, nil
	case opMark:
		u.push(pickleMark{})
	case opPop:
		_, err := u.pop()
		return false, err
	case opPopMark:
		_, err := u.popMark()
		return false, err
	case opDup:
		v, err := u.top()
		if err != nil {
			return false, err
		}
		u.push(v)
	case opNone:
		u.push(nil)
	case opNewTrue:
		u.push(true)
	case opNewFalse:
		u.push(false)
	case opBinInt1, opBinInt2, opBinInt:
		return false, u.readInt(op)
	case opLong1, opLong4:
		return false, u.readLong(op)
	case opBinFloat:
		v, err := u.readN(8)
		if err != nil {
			return false, err
		}
		u.push(math.Float64frombits(binary.BigEndian.Uint64(v)))
	case opBinUnicode, opShortBinUni, opBinUnicode8, opBinString, opShortBinString:
		return false, u.readString(op)
	case opBinBytes, opShortBinBytes, opBinBytes8:
		return false, u.readBytes(op)
	case opEmptyTuple:
		u.push(pickleTuple{})
	case opEmptyList:
		u.push(&pickleList{})
	case opEmptyDict:
		u.push(newPickleDict())
	case opTuple:
		items, err := u.popMark()
		if err != nil {
			return false, err
		}
		u.push(pickleTuple(items))
	case opTuple1, opTuple2, opTuple3:
		n := int(op-opTuple1) + 1
		items := make(pickleTuple, n)
		for i := n - 1; i >= 0; i-- {
			v, err := u.pop()
			if err != nil {
				return false, err
			}
			items[i] = v
		}
		u.push(items)
	case opAppend, opAppends:
		return false, u.appendItems(op)
	case opSetItem, opSetItems:
		return false, u.setItems(op)
	case opBinPut, opLongBinPut, opMemoize:
		return false, u.memoPut(op)
	case opBinGet, opLongBinGet:
		return false, u.memoGet(op)
	case opGlobal:
		module, err := u.readLine()
		if err != nil {
			return false, err
		}
		name, err := u.readLine()
		if err != nil {
			return false, err
		}
		u.push(pickleGlobal{module, name})
	case opStackGlobal:
		name, err := u.pop()
		if err != nil {
			return false, err
		}
		module, err := u.pop()
		if err != nil {
			return false, err
		}
		m, ok1 := module.(string)
		n, ok2 := name.(string)
		if !ok1 || !ok2 {
			return false, fmt.Errorf("%w: STACK_GLOBAL needs two strings", ErrPickle)
		}
		u.push(pickleGlobal{m, n})
	case opReduce:
		return false, u.reduce()
	case opBuild:
		return false, u.build()
	case opBinPersID:
		return false, u.persistentLoad()
	case opNewObj:
		return false, u.newObj()
	case opEmptySet:
		return false, fmt.Errorf("%w: the file contains a set, which a state dict does not", ErrPickle)
	default:
		return false, fmt.Errorf("%w: unknown opcode", ErrPickle)
	}
	return false, nil
}

func (u *unpickler) readInt(op byte) error {
	switch op {
	case opBinInt1:
		v, err := u.readUint(1)
		u.push(int64(v))
		return err
	case opBinInt2:
		v, err := u.readUint(2)
		u.push(int64(v))
		return err
	default:
		v, err := u.readUint(4)
		u.push(int64(int32(uint32(v))))
		return err
	}
}

// readLong decodes LONG1 and LONG4: a little-endian two's-complement
// integer. Values outside int64 are rejected, since no shape, stride or
// offset needs them.
func (u *unpickler) readLong(op byte) error {
	size := 1
	if op == opLong4 {
		size = 4
	}
	n, err := u.readUint(size)
	if err != nil {
		return err
	}
	buf, err := u.readN(n)
	if err != nil {
		return err
	}
	if len(buf) == 0 {
		u.push(int64(0))
		return nil
	}
	be := make([]byte, len(buf))
	for i, b := range buf {
		be[len(buf)-1-i] = b
	}
	v := new(big.Int).SetBytes(be)
	if buf[len(buf)-1]&0x80 != 0 {
		v.Sub(v, new(big.Int).Lsh(big.NewInt(1), uint(8*len(buf))))
	}
	if !v.IsInt64() {
		return fmt.Errorf("%w: integer %s does not fit in 64 bits", ErrPickle, v)
	}
	u.push(v.Int64())
	return nil
}

func (u *unpickler) readString(op byte) error {
	size := 4
	switch op {
	case opShortBinUni, opShortBinString:
		size = 1
	case opBinUnicode8:
		size = 8
	}
	n, err := u.readUint(size)
	if err != nil {
		return err
	}
	buf, err := u.readN(n)
	if err != nil {
		return err
	}
	u.push(string(buf))
	return nil
}

func (u *unpickler) readBytes(op byte) error {
	size := 4
	switch op {
	case opShortBinBytes:
		size = 1
	case opBinBytes8:
		size = 8
	}
	n, err := u.readUint(size)
	if err != nil {
		return err
	}
	buf, err := u.readN(n)
	if err != nil {
		return err
	}
	u.push(buf)
	return nil
}

func (u *unpickler) appendItems(op byte) error {
	var items []any
	if op == opAppend {
		v, err := u.pop()
		if err != nil {
			return err
		}
		items = []any{v}
	} else {
		var err error
		if items, err = u.popMark(); err != nil {
			return err
		}
	}
	target, err := u.top()
	if err != nil {
		return err
	}
	list, ok := target.(*pickleList)
	if !ok {
		return fmt.Errorf("%w: APPEND to a %T", ErrPickle, target)
	}
	list.items = append(list.items, items...)
	return nil
}

func (u *unpickler) setItems(op byte) error {
	var items []any
	if op == opSetItem {
		value, err := u.pop()
		if err != nil {
			return err
		}
		key, err := u.pop()
		if err != nil {
			return err
		}
		items = []any{key, value}
	} else {
		var err error
		if items, err = u.popMark(); err != nil {
			return err
		}
		if len(items)%2 != 0 {
			return fmt.Errorf("%w: SETITEMS with an odd number of values", ErrPickle)
		}
	}
	target, err := u.top()
	if err != nil {
		return err
	}
	dict, ok := target.(*pickleDict)
	if !ok {
		return fmt.Errorf("%w: SETITEM on a %T", ErrPickle, target)
	}
	for i := 0; i < len(items); i += 2 {
		if err := dict.set(items[i], items[i+1]); err != nil {
			return err
		}
	}
	return nil
}

func (u *unpickler) memoPut(op byte) error {
	var index int64
	switch op {
	case opBinPut:
		v, err := u.readUint(1)
		if err != nil {
			return err
		}
		index = int64(v)
	case opLongBinPut:
		v, err := u.readUint(4)
		if err != nil {
			return err
		}
		index = int64(v)
	default:
		index = int64(len(u.memo))
	}
	v, err := u.top()
	if err != nil {
		return err
	}
	u.memo[index] = v
	return nil
}

func (u *unpickler) memoGet(op byte) error {
	size := 1
	if op == opLongBinGet {
		size = 4
	}
	index, err := u.readUint(size)
	if err != nil {
		return err
	}
	v, ok := u.memo[int64(index)]
	if !ok {
		return fmt.Errorf("%w: memo entry %d was never stored", ErrPickle, index)
	}
	u.push(v)
	return nil
}

// reduce calls one of the few callables a state dict uses.
func (u *unpickler) reduce() error {
	args, err := u.pop()
	if err != nil {
		return err
	}
	callable, err := u.pop()
	if err != nil {
		return err
	}
	fn, ok := callable.(pickleGlobal)
	if !ok {
		return fmt.Errorf("%w: REDUCE on a %T", ErrPickle, callable)
	}
	argv, ok := args.(pickleTuple)
	if !ok {
		return fmt.Errorf("%w: REDUCE of %s with arguments of type %T", ErrPickle, fn, args)
	}
	switch fn {
	case globalOrderedDict:
		if len(argv) != 0 {
			return fmt.Errorf("%w: %s with arguments", ErrPickle, fn)
		}
		u.push(newPickleDict())
	case globalRebuildTensor:
		t, err := rebuildTensor(argv)
		if err != nil {
			return err
		}
		u.push(t)
	case globalRebuildParam:
		// _rebuild_parameter(data, requires_grad, backward_hooks)
		if len(argv) < 2 {
			return fmt.Errorf("%w: %s with %d arguments", ErrPickle, fn, len(argv))
		}
		t, ok := argv[0].(*tensorRef)
		grad, ok2 := argv[1].(bool)
		if !ok || !ok2 {
			return fmt.Errorf("%w: %s with arguments %T, %T", ErrPickle, fn, argv[0], argv[1])
		}
		param := *t
		param.requiresGrad = grad
		u.push(&param)
	default:
		return fmt.Errorf("%w: the file calls %s, which a state dict of tensors does not use", ErrPickle, fn)
	}
	return nil
}

// newObj rejects NEWOBJ, which creates an instance of a Python class (such
// as a whole torch.nn.Module) that a state dict of tensors does not contain.
func (u *unpickler) newObj() error {
	if _, err := u.pop(); err != nil {
		return err
	}
	class, err := u.pop()
	if err != nil {
		return err
	}
	return fmt.Errorf("%w: the file contains an object of class %v; save model.state_dict() rather than the model", ErrPickle, class)
}

// rebuildTensor reads the arguments of _rebuild_tensor_v2(storage,
// storage_offset, size, stride, requires_grad, backward_hooks[, metadata]).
func rebuildTensor(argv pickleTuple) (*tensorRef, error) {
	if len(argv) < 5 {
		return nil, fmt.Errorf("%w: _rebuild_tensor_v2 with %d arguments", ErrPickle, len(argv))
	}
	storage, ok := argv[0].(*storageRef)
	if !ok {
		return nil, fmt.Errorf("%w: tensor storage of type %T", ErrPickle, argv[0])
	}
	offset, ok := argv[1].(int64)
	if !ok {
		return nil, fmt.Errorf("%w: tensor storage offset of type %T", ErrPickle, argv[1])
	}
	size, err := intTuple(argv[2], "size")
	if err != nil {
		return nil, err
	}
	stride, err := intTuple(argv[3], "stride")
	if err != nil {
		return nil, err
	}
	if len(size) != len(stride) {
		return nil, fmt.Errorf("%w: tensor size %v and stride %v differ in length", ErrPickle, size, stride)
	}
	grad, ok := argv[4].(bool)
	if !ok {
		return nil, fmt.Errorf("%w: requires_grad of type %T", ErrPickle, argv[4])
	}
	return &tensorRef{storage: storage, offset: offset, size: size, stride: stride, requiresGrad: grad}, nil
}

func intTuple(v any, field string) ([]int64, error) {
	tuple, ok := v.(pickleTuple)
	if !ok {
		return nil, fmt.Errorf("%w: tensor %s of type %T", ErrPickle, field, v)
	}
	out := make([]int64, len(tuple))
	for i, x := range tuple {
		n, ok := x.(int64)
		if !ok {
			return nil, fmt.Errorf("%w: tensor %s element of type %T", ErrPickle, field, x)
		}
		out[i] = n
	}
	return out, nil
}

// build applies BUILD's state. A state dict's OrderedDict carries its
// _metadata attribute this way; the attribute holds module versions that
// only Python's load_state_dict uses, so it is dropped.
func (u *unpickler) build() error {
	state, err := u.pop()
	if err != nil {
		return err
	}
	target, err := u.top()
	if err != nil {
		return err
	}
	switch target.(type) {
	case *pickleDict, *tensorRef:
		if _, ok := state.(*pickleDict); ok || state == nil {
			return nil
		}
	}
	return fmt.Errorf("%w: BUILD of a %T with a state of type %T", ErrPickle, target, state)
}

// persistentLoad reads a persistent id ('storage', STORAGE_TYPE, KEY,
// LOCATION, NUMEL). The location (a device such as "cpu" or "cuda:0") is
// ignored: every tensor is loaded on the CPU.
func (u *unpickler) persistentLoad() error {
	pid, err := u.pop()
	if err != nil {
		return err
	}
	id, ok := pid.(pickleTuple)
	if !ok || len(id) != 5 || id[0] != "storage" {
		return fmt.Errorf("%w: persistent id %v is not a storage", ErrPickle, pid)
	}
	class, ok := id[1].(pickleGlobal)
	if !ok || class.module != "torch" {
		return fmt.Errorf("%w: storage type %v", ErrPickle, id[1])
	}
	dtype, ok := storageTypes[class.name]
	if !ok {
		return fmt.Errorf("%w: storage type %s", ErrPickle, class)
	}
	key, ok := id[2].(string)
	if !ok {
		return fmt.Errorf("%w: storage key of type %T", ErrPickle, id[2])
	}
	numel, ok := id[4].(int64)
	if !ok || numel < 0 {
		return fmt.Errorf("%w: storage size %v", ErrPickle, id[4])
	}
	u.push(&storageRef{dtype: dtype, key: key, numel: numel})
	return nil
}

// storageClasses names the storage class of each element type, for the
// writer.
var storageClasses = func() map[DType]string {
	out := make(map[DType]string, len(storageTypes))
	for name, dtype := range storageTypes {
		out[dtype] = name
	}
	return out
}()

// pickledTensor describes one tensor for the writer: its storage record,
// the storage's element type and length, and where the tensor lies in it.
type pickledTensor struct {
	storage      int
	dtype        DType
	storageNumel int64
	offset       int64
	size, stride []int64
}

// pickler writes protocol 2, which every torch.load reads, without a memo.
type pickler struct {
	buf bytes.Buffer
}

func (p *pickler) global(module, name string) {
	p.buf.WriteByte(opGlobal)
	p.buf.WriteString(module + "\n" + name + "\n")
}

func (p *pickler) str(s string) {
	p.buf.WriteByte(opBinUnicode)
	var n [4]byte
	binary.LittleEndian.PutUint32(n[:], uint32(len(s)))
	p.buf.Write(n[:])
	p.buf.WriteString(s)
}

func (p *pickler) int(v int64) {
	switch {
	case v >= 0 && v < 1<<8:
		p.buf.WriteByte(opBinInt1)
		p.buf.WriteByte(byte(v))
	case v >= 0 && v < 1<<16:
		p.buf.WriteByte(opBinInt2)
		p.buf.WriteByte(byte(v))
		p.buf.WriteByte(byte(v >> 8))
	case v >= math.MinInt32 && v <= math.MaxInt32:
		p.buf.WriteByte(opBinInt)
		var n [4]byte
		binary.LittleEndian.PutUint32(n[:], uint32(int32(v)))
		p.buf.Write(n[:])
	default:
		// LONG1 with eight little-endian two's-complement bytes.
		p.buf.WriteByte(opLong1)
		p.buf.WriteByte(8)
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(v))
		p.buf.Write(n[:])
	}
}

func (p *pickler) intTuple(values []int64) {
	switch len(values) {
	case 0:
		p.buf.WriteByte(opEmptyTuple)
		return
	case 1, 2, 3:
		for _, v := range values {
			p.int(v)
		}
		p.buf.WriteByte(opTuple1 + byte(len(values)-1))
		return
	}
	p.buf.WriteByte(opMark)
	for _, v := range values {
		p.int(v)
	}
	p.buf.WriteByte(opTuple)
}

func (p *pickler) emptyOrderedDict() {
	p.global(globalOrderedDict.module, globalOrderedDict.name)
	p.buf.WriteByte(opEmptyTuple)
	p.buf.WriteByte(opReduce)
}

// pickleStateDict returns the data.pkl of an OrderedDict from keys to
// tensors, written as Python's torch.save writes a state dict (without its
// _metadata attribute). Tensors do not require gradients, as the tensors of
// Python's state_dict() do not.
func pickleStateDict(keys []string, tensors []pickledTensor) ([]byte, error) {
	var p pickler
	p.buf.Write([]byte{opProto, 2})
	p.emptyOrderedDict()
	if len(keys) > 0 {
		p.buf.WriteByte(opMark)
	}
	for i, key := range keys {
		t := tensors[i]
		class, ok := storageClasses[t.dtype]
		if !ok {
			return nil, fmt.Errorf("%w: %s has dtype %v, which has no torch storage class", ErrPickle, key, t.dtype)
		}
		p.str(key)
		p.global(globalRebuildTensor.module, globalRebuildTensor.name)
		p.buf.WriteByte(opMark)

		p.buf.WriteByte(opMark)
		p.str("storage")
		p.global("torch", class)
		p.str(strconv.Itoa(t.storage))
		p.str("cpu")
		p.int(t.storageNumel)
		p.buf.WriteByte(opTuple)
		p.buf.WriteByte(opBinPersID)

		p.int(t.offset)
		p.intTuple(t.size)
		p.intTuple(t.stride)
		p.buf.WriteByte(opNewFalse)
		p.emptyOrderedDict() // backward hooks
		p.buf.WriteByte(opTuple)
		p.buf.WriteByte(opReduce)
	}
	if len(keys) > 0 {
		p.buf.WriteByte(opSetItems)
	}
	p.buf.WriteByte(opStop)
	return p.buf.Bytes(), nil
}
